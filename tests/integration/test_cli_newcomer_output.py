"""What the `winback` commands print to a newcomer following the README: in an ordinary terminal (80 and 120
columns), on a fresh store, at every start; each command run as its own process, as the console script runs."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from model.datafiles import DEMO_MERCHANTS_FILE
from model.history import read_history, write_attempts
from pipelines.cli import app
from tests.factories import Printed, run_winback

#: A code and a message longer than any column of an 80-column terminal; the message holds what rich reads as markup.
LONG_CODE = "processor_declined_transaction_not_permitted_to_cardholder_0042"
LONG_MESSAGE = "[bold]Transaction not permitted[/bold] to cardholder: " + "the issuer gave no further reason. " * 6


@pytest.fixture(scope="module")
def history_with_a_long_code(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small simulated history in which one order's first failure has a long, never-seen code and message."""
    out = tmp_path_factory.mktemp("codes")
    result = CliRunner().invoke(app, ["simulate", "--out", str(out), "--orders", "300", "--seed", "5"])
    assert result.exit_code == 0, result.output
    history = read_history(out / "attempts.parquet", out / "nudges.parquet")
    attempts = history.attempts.copy()
    first_failure = attempts.index[attempts["status"] == "failure"][0]
    attempts.loc[first_failure, ["error_code", "error_message"]] = [LONG_CODE, LONG_MESSAGE]
    write_attempts(attempts, out / "attempts.parquet")
    return out


def _codes_report(history: Path, columns: int, *options: str) -> tuple[Printed, pd.DataFrame]:
    """`winback codes report` on ``history`` against an empty registry (rules-only: every code is new), in a
    terminal ``columns`` wide, with ``options``; with the CSV it wrote."""
    name = f"{columns}{''.join(options)}"
    printed = run_winback(
        "codes", "report", "--attempts", "attempts.parquet", "--nudges", "nudges.parquet",
        "--tracking-uri", f"sqlite:///{history / f'mlflow-{name}.db'}", "--csv", f"codes-{name}.csv", *options,
        cwd=history, columns=columns,
    )  # fmt: skip
    assert printed.exit_code == 0, printed.stderr
    return printed, pd.read_csv(history / f"codes-{name}.csv", dtype={"error_code": str})


def _counts_rows(stdout: str, numbers: int) -> dict[str, list[str]]:
    """The counts table's rows as printed: each code (its folded pieces joined) with its ``numbers`` cells."""
    lines = stdout.splitlines()
    rule = next(index for index, line in enumerate(lines) if set(line.strip()) == {"─"})
    rows: dict[str, list[str]] = {}
    code, cells = "", []
    for line in lines[rule + 1 :]:
        if line.startswith("trained on:"):  # the legend under the table
            break
        tokens = line.split()
        if len(tokens) > numbers:  # a row: its code (or the code's first piece), then its cells
            if code:
                rows[code] = cells
            code, cells = "".join(tokens[:-numbers]), tokens[-numbers:]
        else:  # the rest of a folded code
            code += "".join(tokens)
    rows[code] = cells
    return rows


@pytest.mark.parametrize("columns", [80, 120])
def test_codes_report_is_a_table_that_fits_the_terminal_with_every_code_and_count(
    history_with_a_long_code: Path, columns: int
) -> None:
    # At 80-120 columns the report's eleven columns were folded to a few letters each: codes, counts and the
    # nearest codes' text broken over a dozen lines per row, the headers one syllable a line.
    printed, report = _codes_report(history_with_a_long_code, columns, "--all")
    assert max(len(line) for line in printed.stdout.splitlines()) <= columns, printed.stdout
    shown = _counts_rows(printed.stdout, numbers=7)
    expected = {
        f"{row.connector}/{row.error_code}": [
            str(row.training_support), str(row.failures), str(row.retries), str(row.retry_successes),
            str(row.recovered_orders), f"{row.retry_probability:.2f}", "yes" if row.retryable else "no",
        ]
        for row in report.itertuples()
    }  # fmt: skip
    assert len(expected) > 5
    assert shown == expected, printed.stdout
    # The example message: shown as written (not read as markup), long ones cut with a marker.
    described = " ".join(printed.stdout.split("What each code says", 1)[1].split())
    assert "[bold]Transaction not permitted[/bold] to cardholder" in described
    assert "…" in described


def test_codes_report_breaks_a_long_code_after_a_separator_never_mid_word(history_with_a_long_code: Path) -> None:
    # At 80 columns the code column (22 wide) broke codes wherever it ended: "razorpay/payment_faile" over "d",
    # "razorpay/vpa_resolutio" over "n_failed".
    printed, report = _codes_report(history_with_a_long_code, 80, "--all")
    lines = printed.stdout.splitlines()
    rule = next(index for index, line in enumerate(lines) if set(line.strip()) == {"─"})
    legend = next(index for index, line in enumerate(lines) if line.startswith("trained on:"))
    counts = lines[rule + 1 : legend]
    broken = 0
    for line, after in itertools.pairwise(counts):
        if len(after.split()) == 1:  # the rest of the code above
            assert line.split()[0][-1] in "/_-.:", (line, after, printed.stdout)
            broken += 1
    assert broken >= 5, printed.stdout
    # ... and in the second table, which gives a code a wider column: the long code, bold above its message.
    described = printed.stdout.split("What each code says", 1)[1].splitlines()
    first = next(line for line in described if line.startswith("razorpay/processor_"))
    assert first.split()[0][-1] == "_", printed.stdout
    assert f"razorpay/{LONG_CODE}" in set(report["connector"] + "/" + report["error_code"])


def test_codes_report_shows_a_digest_of_the_most_failed_codes_and_says_how_to_see_the_rest(
    history_with_a_long_code: Path,
) -> None:
    # On a 5,000-order history against a fresh registry the report printed all 294 codes: 1,121 lines at 80 columns.
    printed, report = _codes_report(history_with_a_long_code, 80)
    assert len(report) > 20  # the CSV keeps every code
    shown = _counts_rows(printed.stdout, numbers=7)
    assert list(shown) == [f"{row.connector}/{row.error_code}" for row in report.head(20).itertuples()]
    said = " ".join(printed.stdout.split())
    assert (
        f"showing 20 of {len(report)} codes, those with the most failures: --all shows the other {len(report) - 20}; "
        "codes-80.csv has every one"
    ) in said, printed.stdout
    assert said.count("none known") == 20  # the second table: the same 20 codes
    fewer, _ = _codes_report(history_with_a_long_code, 80, "--limit=3")
    assert len(_counts_rows(fewer.stdout, numbers=7)) == 3
    assert f"showing 3 of {len(report)} codes" in " ".join(fewer.stdout.split())


def _executor_start(folder: Path, *extra_env: tuple[str, str], config: Path | None = None) -> Printed:
    """`winback executor run` for a second on the database and registry in ``folder`` (made on the first run)."""
    return run_winback(
        "executor", "run", "--stop-after", "1", "--database-url", f"sqlite:///{folder / 'winback.db'}",
        "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}", *(("--config", str(config)) if config else ()),
        cwd=folder, env=dict(extra_env),
    )  # fmt: skip


def test_executor_start_says_in_one_line_that_it_created_the_registry_store(tmp_path: Path) -> None:
    # Every start of a worker logged alembic's "Context impl SQLiteImpl." and "Will assume non-transactional DDL."
    # (MLflow's store checking its schema), with nothing to migrate; the first start in a new folder logged 67
    # "Running upgrade A -> B, ..." lines, MLflow creating its store one migration at a time.
    first = _executor_start(tmp_path)
    assert first.exit_code == 0, first.stderr
    assert "Running upgrade" not in first.stderr, first.stderr
    assert "alembic" not in first.stderr, first.stderr
    (created,) = [line for line in first.stderr.splitlines() if "MLflow store" in line]
    assert f"created the tables of a new MLflow store, sqlite:///{tmp_path / 'mlflow.db'}: " in created
    assert " migrations, to revision " in created
    assert "is running" in first.stderr
    again = _executor_start(tmp_path)
    assert again.exit_code == 0, again.stderr
    assert "is running" in again.stderr
    assert "alembic" not in again.stderr, again.stderr
    assert "MLflow store" not in again.stderr  # nothing was created
    # Still there for whoever asks for everything: each step on a new store, the context lines on any.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    verbose = _executor_start(fresh, ("WINBACK_LOG_LEVEL", "DEBUG"))
    assert verbose.exit_code == 0, verbose.stderr
    assert "Will assume non-transactional DDL." in verbose.stderr
    assert verbose.stderr.count("Running upgrade") > 10, verbose.stderr
    assert "created the tables of a new MLflow store" in verbose.stderr


def test_a_command_run_where_mlflow_was_imported_first_prints_none_of_its_store_creation_lines(
    tmp_path: Path,
) -> None:
    """A process that had imported MLflow before calling the CLI (a notebook, a test: MLflow's logger at its default
    INFO) printed "Creating initial MLflow database tables..." and "Updating database tables" when a command opened
    a new store; the command's lines only now, and MLflow's warnings still pass."""
    import os
    import subprocess
    import sys

    code = (
        "import logging, sys\n"
        "import mlflow\n"
        "from typer.testing import CliRunner\n"
        "from pipelines.cli import app\n"
        "folder = sys.argv[1]\n"
        "result = CliRunner().invoke(app, ['codes', 'report', '--attempts', f'{folder}/a.parquet', '--nudges',\n"
        "    f'{folder}/n.parquet', '--tracking-uri', f'sqlite:///{folder}/store/mlflow.db'])\n"
        "logging.getLogger('mlflow.store.db.utils').warning('a warning of MLflow')\n"
        "print(result.exit_code, result.output)\n"
    )
    # Files there but not history: the command opens the store, then refuses them (a missing file is refused first).
    (tmp_path / "a.parquet").write_text("not parquet")
    (tmp_path / "n.parquet").write_text("not parquet")
    environment = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_LOGGING_LEVEL", "MLFLOW_CONFIGURE_LOGGING")}
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=environment, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "store" / "mlflow.db").is_file()  # the store was created
    printed = done.stdout + done.stderr
    assert "Creating initial" not in printed, printed
    assert "Updating database tables" not in printed, printed
    assert "alembic" not in printed, printed
    assert done.stdout.startswith("2 error: invalid history"), printed
    assert "WARNING mlflow.store.db.utils: a warning of MLflow" in done.stderr, printed


def test_executor_start_says_which_connectors_no_silent_retry_can_reach(tmp_path: Path, mlflow_store: str) -> None:
    """(Newcomer walk.) The shipped config names no connector_endpoints (CONTRACT.md section 4 lets a merchant omit
    them): `winback executor run` started without a word, and each silent retry was then dead-lettered, "no
    connector_endpoints entry for 'adyen' and no sandbox is configured (WINBACK_SANDBOX_URL)", one order at a time.
    Each worker now says it once at start, per merchant, with the connectors' key path."""
    # The registry store the starts use (tmp_path/mlflow.db) is the fixture's copy: creating one is another test's.
    assert mlflow_store == f"sqlite:///{tmp_path / 'mlflow.db'}"
    unreached = _executor_start(tmp_path, ("WINBACK_SANDBOX_URL", ""))
    assert unreached.exit_code == 0, unreached.stderr
    (warned,) = [line for line in unreached.stderr.splitlines() if "connector_endpoints" in line]
    assert '"level":"WARNING"' in warned
    assert (
        "no connector_endpoints entry and no WINBACK_SANDBOX_URL for merchants.m_in_stream.connectors: razorpay, "
        "payu; merchants.m_in_shop.connectors: razorpay, payu; merchants.m_us_saas.connectors: stripe, adyen, "
        "cybersource; "
    ) in warned
    assert "each silent retry through them will be dead-lettered" in warned
    # A sandbox to send them to: nothing to say.
    sandboxed = _executor_start(tmp_path, ("WINBACK_SANDBOX_URL", "http://127.0.0.1:9"))
    assert sandboxed.exit_code == 0, sandboxed.stderr
    assert "is running" in sandboxed.stderr
    assert "connector_endpoints" not in sandboxed.stderr
    # An endpoint key naming none of its merchant's connectors (a typo, or one only requests name): said once.
    config = yaml.safe_load(DEMO_MERCHANTS_FILE.read_text())
    config["merchants"]["m_us_saas"]["connector_endpoints"] = {"adyn": {"kind": "sandbox"}}
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump(config))
    named = _executor_start(tmp_path, ("WINBACK_SANDBOX_URL", "http://127.0.0.1:9"), config=typo)
    assert named.exit_code == 0, named.stderr
    (warned,) = [line for line in named.stderr.splitlines() if "connector_endpoints" in line]
    assert '"level":"WARNING"' in warned
    assert (
        "connector_endpoints entries naming none of their merchant's connectors: "
        "merchants.m_us_saas.connector_endpoints.adyn (its connectors: stripe, adyen, cybersource);"
    ) in warned


def _fresh_store(folder: Path) -> str:
    """The URL of a winback database in ``folder`` as `winback serve` or `winback executor run` leaves it at its first
    start: every table, no order, decision or outcome."""
    from service.api.store import make_engine
    from service.migrations import upgrade

    url = f"sqlite:///{folder / 'winback.db'}"
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    return url


def test_history_export_of_a_fresh_store_says_it_holds_no_outcomes_and_writes_valid_empty_files(
    history_with_a_long_code: Path, tmp_path: Path
) -> None:
    # On a store that a scorer or executor had just created, the export wrote three empty files and "for 0 orders",
    # with no word on why or where outcomes come from.
    url = _fresh_store(tmp_path)
    out = tmp_path / "history"
    wide = {"COLUMNS": "1000"}  # a line the test reads is never wrapped
    result = CliRunner().invoke(app, ["history", "export", "--out", str(out), "--database-url", url], env=wide)
    assert result.exit_code == 0, result.output  # the files are written, and valid: as documented
    # A console made by an earlier test in this process may keep that test's width: read the lines unwrapped (rich
    # breaks a line at a space, which it keeps, or inside a path, which must be joined again).
    said = result.output.replace("\n", "")
    assert f"no outcomes in {url} yet" in said
    assert "winback executor run" in said
    assert "POST /v1/outcomes" in said
    history = read_history(out / "attempts.parquet", out / "nudges.parquet", stops_path=out / "stops.parquet")
    assert history.attempts.empty
    assert history.nudges.empty
    # The files' columns and types are the contract's: those of the files `winback simulate` writes.
    for name in ("attempts", "nudges", "stops"):
        written = pq.read_schema(out / f"{name}.parquet").remove_metadata()
        assert written.equals(pq.read_schema(history_with_a_long_code / f"{name}.parquet").remove_metadata()), name
    since = CliRunner().invoke(
        app, ["history", "export", "--out", str(out), "--database-url", url, "--since", "2026-11-01"], env=wide
    )
    assert since.exit_code == 0, since.output
    assert "for orders started at or after 2026-11-01" in since.output.replace("\n", "")


def test_codes_report_of_an_empty_export_says_there_is_no_code_to_report(tmp_path: Path) -> None:
    # The README's next step after the export said "every error code of the history was seen at least 30 times by
    # model rules-only" of a history with no code at all.
    out = tmp_path / "history"
    exported = CliRunner().invoke(
        app, ["history", "export", "--out", str(out), "--database-url", _fresh_store(tmp_path)]
    )
    assert exported.exit_code == 0, exported.output
    history = ["--attempts", str(out / "attempts.parquet"), "--nudges", str(out / "nudges.parquet")]
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = CliRunner().invoke(app, ["codes", "report", *history, "--tracking-uri", store], env={"COLUMNS": "1000"})
    assert result.exit_code == 0, result.output
    assert "holds no failed attempt: there is no error code to report" in result.output
    assert "every error code" not in result.output


def test_evaluate_episodes_table_keeps_every_figure_whole_at_80_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    # The README's `winback evaluate` on the 20,000-order history printed, at 80 columns, "16,373." over "307" and
    # "1,143.38" over "9": the five policies' columns were squeezed under their long names.
    import io

    from rich.console import Console

    import pipelines.cli as cli

    # What that run measured, two of its five policies' rows in full (evaluation/episodes.csv).
    row = {"orders": 2000, "recovered_orders": 513, "recovery_rate": 0.256, "recovered_gmv_usd": 16373.307,
           "retry_fees_usd": 120.29, "message_costs_usd": 10.492, "net_value_usd": 16242.524, "nudges_sent": 5196,
           "silent_retries": 1070, "rule_violations": 0, "decisions": 7227,
           "decisions_per_second": 1143.389}  # fmt: skip
    policies = ["winback@champion", "rules-only", "static_retry", "static_retry_then_retarget", "logging"]
    episodes = pd.DataFrame([{"policy": policy, **row} for policy in policies])
    printed = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=printed, width=80))
    cli.print_frame(cli.episodes_shown(episodes), "simulated episodes: 2,000 orders per policy")
    lines = printed.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80, printed.getvalue()
    shown = {line.split()[0]: line.split()[1:] for line in lines if line.split() and line.split()[0] in row}
    assert shown["recovered_gmv_usd"] == ["16,373.31"] * 5, printed.getvalue()
    assert shown["decisions_per_second"] == ["1,143.389"] * 5
    assert shown["recovery_rate"] == ["0.256"] * 5
    assert shown["orders"] == ["2000"] * 5


def _rendered(renderable: object) -> str:
    """``renderable`` as a 120-column terminal shows it."""
    import io

    from rich.console import Console

    printed = io.StringIO()
    Console(file=printed, width=120).print(renderable)
    return printed.getvalue()


def test_every_table_shows_a_missing_figure_as_a_dash_not_nan(monkeypatch: pytest.MonkeyPatch) -> None:
    # `train` printed "policy_value_dr_champion_view  nan" with no champion yet (also in `make demo`), `simulate`
    # "hours_to_recovery  nan" for a failure class nothing recovered, the gate and `codes report` "n/a".
    import io
    import math

    from rich.console import Console

    import pipelines.cli as cli
    from pipelines.codes import report_view
    from pipelines.gate import GATE_METRICS, GateCheck, GateResult, gate_table
    from pipelines.train import _metrics_table

    def words(text: str) -> set[str]:
        return {word.strip("│┃") for word in text.split()}

    metrics = _rendered(_metrics_table({"policy_value_dr": 5.3, "policy_value_dr_champion_view": math.nan}))
    assert "policy_value_dr_champion_view │      - │" in metrics, metrics
    check = GateCheck(GATE_METRICS[-1], 5.3, math.nan, True, "the champion's is undefined")
    gate = _rendered(gate_table(GateResult(True, "2", "1", checks=(check,))))
    row = next(line for line in gate.splitlines() if line.startswith("policy value (DR) "))
    assert row.split()[4:7] == ["5.3000", "-", "-"], gate  # challenger, champion, delta
    report = pd.DataFrame(
        [{"connector": "stripe", "error_code": "x1", "training_support": 0, "failures": 3, "retries": 0,
          "retry_successes": 0, "recovered_orders": 0, "retry_probability": math.nan, "retryable": False,
          "example_message": "m", "nearest": ""}]
    )  # fmt: skip
    codes = _rendered(report_view(report, "1", 30))
    assert _counts_rows(codes, numbers=7)["stripe/x1"] == ["0", "3", "0", "0", "0", "-", "no"], codes
    printed = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=printed, width=120))
    mix = pd.DataFrame(
        {"orders": [9, 5000], "recovered": [0, 1301], "hours_to_recovery": [math.nan, 36.998]},
        index=pd.Index(["duplicate", "all"], name="error_class"),
    )
    cli.print_frame(mix, "failure mix and logging-policy recovery")
    episodes = pd.DataFrame([{"policy": "logging", "orders": 0, "recovery_rate": math.nan, "net_value_usd": math.nan}])
    cli.print_frame(cli.episodes_shown(episodes), "simulated episodes")
    shown = {line.split()[0]: line.split()[1:] for line in printed.getvalue().splitlines() if line.split()}
    assert shown["duplicate"] == ["9", "0", "-"], printed.getvalue()
    assert shown["recovery_rate"] == ["-"], printed.getvalue()
    assert shown["net_value_usd"] == ["-"], printed.getvalue()
    assert "nan" not in words(metrics + gate + codes + printed.getvalue())


def _command_paths() -> list[tuple[str, ...]]:
    """Every command and group of `winback` as the words that call it (the root as ``()``)."""
    import typer.main

    def paths(command: object, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
        below = getattr(command, "commands", {})
        return [path, *(p for name, sub in below.items() for p in paths(sub, (*path, name)))]

    return paths(typer.main.get_command(app))


def test_help_text_is_wrapped_as_paragraphs_not_as_the_docstring_s_lines() -> None:
    # Typer 0.29 kept a docstring's line breaks: `winback evaluate --help` at 100 columns read "... (IPS, SNIPS, DR;
    # with the history's stops" over "file, the points where ...", `retrain --help` had a line of "a" alone.
    import inspect

    import typer.main

    root = typer.main.get_command(app)
    checked = 0
    for path in _command_paths():
        command = root
        for name in path:
            command = command.commands[name]  # type: ignore[attr-defined]
        shown = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "250"}).output
        lines = [line.strip() for line in shown.splitlines()]
        for paragraph in inspect.cleandoc(command.help or "").split("\n\n")[1:]:
            assert " ".join(paragraph.split()) in " ".join(" ".join(lines).split()), (path, shown)
            source = paragraph.splitlines()
            if len(source) > 1:  # the first source line, ended where the docstring's was, is not a line of the help
                assert source[0].strip() not in lines, (path, shown)
                checked += 1
    assert checked >= 5


def test_help_shows_flags_as_flags_without_a_type() -> None:
    # Typer 0.29 printed "<bool>" beside every flag (--promote, --serve/--no-serve, --help), as if it took a value.
    every = _command_paths()
    assert ("executor", "resolve-charge") in every
    assert len(every) > 15
    for path in every:
        result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "120"})
        assert result.exit_code == 0, (path, result.output)
        assert "<bool>" not in result.output, (path, result.output)
        assert "--help" in result.output
        assert "Show this message and exit." in result.output
    shown = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "120"}).output
    promote = next(line for line in shown.splitlines() if "--promote" in line)
    assert promote.split("│")[1].split()[:2] == ["--promote", "Move"], promote  # the help right after the flag
    assert "<path>" in shown  # options that take a value still say what kind


def test_help_at_80_columns_cuts_no_word_with_an_ellipsis() -> None:
    # At 80 columns `winback train --help` showed "$MLFLOW_TRACKING_U…" and "sqlite:///mlruns/m…", `--scheduler`'s
    # example "tcp://10.0.0.5:878…", `retrain --help` "retry_auc,retry_log…": the help column was too narrow
    # beside "<int range> [x>=1]", and Typer cuts a word that does not fit.
    for path in _command_paths():
        result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "80"})
        assert result.exit_code == 0, (path, result.output)
        assert "…" not in result.output, (path, result.output)
        assert max(len(line) for line in result.output.splitlines()) <= 80, (path, result.output)
    shown = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "80"}).output
    assert "<int> [x>=1]" in shown  # a bounded number still says its bounds
    assert "tcp://10.0.0.5:8786" in shown


def test_train_s_notes_wrap_at_words_in_an_80_column_terminal(history_with_a_long_code: Path, tmp_path: Path) -> None:
    # The note on the decision points the OPE leaves out without a stops file, and the first version's gate
    # verdict, printed as one line each: the terminal broke them wherever its 80th column fell, mid-word.
    for name in ("attempts.parquet", "nudges.parquet"):  # the history without its stops file
        (tmp_path / name).write_bytes((history_with_a_long_code / name).read_bytes())
    printed = run_winback(
        "train", "--attempts", "attempts.parquet", "--nudges", "nudges.parquet", "--episodes", "0",
        "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path, columns=80,
    )  # fmt: skip
    assert printed.exit_code == 0, printed.stderr
    lines = printed.stdout.splitlines()
    # Only the last line, naming the store's URI for copying whole, may be longer.
    assert lines[-1].startswith("registered winback version 1"), printed.stdout
    assert max(len(line) for line in lines[:-1]) <= 80, printed.stdout
    note = next(index for index, line in enumerate(lines) if line.startswith("note: "))
    assert "no stops file" in " ".join(lines[note : note + 4]), printed.stdout
    assert lines[note + 1].strip(), printed.stdout  # the note goes on, on a line of its own


def test_train_prints_no_blank_line_and_no_nan_into_a_pipe(history_with_a_long_code: Path, tmp_path: Path) -> None:
    # Into a pipe (a log file, `make demo | tee`), `winback train` printed a blank line after "logged stops: ...",
    # where its progress bar had been, and "nan" for the gate's policy value with no champion yet.
    printed = run_winback(
        "train", "--attempts", str(history_with_a_long_code / "attempts.parquet"),
        "--nudges", str(history_with_a_long_code / "nudges.parquet"), "--episodes", "0", "--promote",
        "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path, columns=80,
    )  # fmt: skip
    assert printed.exit_code == 0, printed.stderr
    lines = printed.stdout.splitlines()
    assert lines[0].startswith("logged stops: "), printed.stdout
    # Then a plain line per training step (the bar draws nothing into a pipe), then the tables.
    assert [line.split(":")[0] for line in lines[1:7]] == [f"training step {n}/6" for n in range(1, 7)], lines
    assert lines[7].strip() == "Holdout metrics of winback version 1", printed.stdout
    # The gate's policy value is the challenger's DR under the holdout's own reward model: there without a champion.
    policy_value = next(line for line in lines if "policy_value_dr " in line)
    assert math.isfinite(float(policy_value.split("│")[2].strip().replace(",", ""))), printed.stdout
    assert "policy_value_dr is -" not in " ".join(printed.stdout.split()), printed.stdout
    assert "nan" not in printed.stdout.split()


def test_train_progress_in_a_terminal_counts_the_refit_among_its_steps(
    history_with_a_long_code: Path, tmp_path: Path
) -> None:
    # In a terminal (make demo) the bar's last step read "register ... 6/5": the refit step was not in the total.
    import io
    import re

    from rich.console import Console

    from pipelines.train import train_command

    drawn = io.StringIO()
    terminal = Console(file=drawn, width=100, force_terminal=True, force_interactive=True, color_system=None)
    code = train_command(
        history_with_a_long_code / "attempts.parquet", history_with_a_long_code / "nudges.parquet",
        f"sqlite:///{tmp_path / 'mlflow.db'}", episodes=0, console=terminal,
    )  # fmt: skip
    assert code == 0, drawn.getvalue()
    counts = {tuple(map(int, found)) for found in re.findall(r" (\d+)/(\d+) ", drawn.getvalue())}
    assert counts, drawn.getvalue()
    assert {total for _, total in counts} == {6}, counts
    assert max(done for done, _ in counts) == 6, counts


@pytest.mark.parametrize("columns", [80, 120])
def test_a_table_title_naming_a_file_keeps_the_path_whole(monkeypatch: pytest.MonkeyPatch, columns: int) -> None:
    # `winback evaluate` titled its episodes "simulated episodes: 2,000 orders per policy (all of it in" over
    # "evaluation/evaluation.md)": the title was wrapped to the table's width (76 columns), at 120 columns too.
    import io

    from rich.console import Console

    import pipelines.cli as cli

    episodes = pd.DataFrame([{"policy": name, "orders": 2000, "recovery_rate": 0.3} for name in ("a", "b")])
    printed = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=printed, width=columns))
    title = "simulated episodes: 2,000 orders per policy (all of it in evaluation/evaluation.md)"
    cli.print_frame(cli.episodes_shown(episodes), title)
    lines = printed.getvalue().splitlines()
    assert lines[0] == title, printed.getvalue()  # a terminal narrower than the title wraps it, whole words and all
    assert lines[1].split() == ["simulated", "episodes", "a", "b"], printed.getvalue()  # the header, right under it


@pytest.mark.parametrize("columns", [80, 120])
def test_import_gsm_names_the_file_it_read_on_one_line(tmp_path: Path, columns: int) -> None:
    # "2 codes from" over "gateway_status_map.csv": the title was wrapped to the width of its two-column table.
    import io

    from rich.console import Console

    from pipelines.codes import import_gsm

    gsm = tmp_path / "exports" / "gateway_status_map.csv"
    gsm.parent.mkdir()
    gsm.write_text(
        "connector,flow,sub_flow,code,message,status,router_error,decision,step_up_possible,unified_code,"
        "unified_message,error_category,clear_pan_possible\n"
        "stripe,authorize,authorize,xx1,Boom,failure,,retry,false,,,,false\n"
        "adyen,authorize,authorize,zz9,Issuer down,failure,,do_default,false,UE_9000,,processor_downtime,false\n"
    )
    printed = io.StringIO()
    import_gsm(gsm, tmp_path / "overlay.csv", console=Console(file=printed, width=columns))
    assert printed.getvalue().splitlines()[0] == f"2 codes from {gsm}", printed.getvalue()


def test_simulate_says_one_of_a_thing_in_the_singular(tmp_path: Path) -> None:
    # `winback simulate --orders 1` said "(1 attempts)", "(1 nudges)", "(1 stops)" and "1 failed orders".
    out = tmp_path / "one"
    result = CliRunner().invoke(app, ["simulate", "--out", str(out), "--orders", "1", "--seed", "8"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.replace(f"\n{out.name}/", f"{out.name}/").split())  # unwrapped, paths joined
    assert "(1 attempt), " in said, said
    assert "(1 nudge) and" in said, said
    assert "(1 stop): 1 failed order in " in said, said
    for plural in ("1 attempts", "1 nudges", "1 stops", "1 failed orders"):
        assert plural not in said, said
    assert "(0 orders/s)" not in said, said  # one order in 1.8 s was "0 orders/s"


def test_demo_on_a_port_in_use_says_so_before_it_simulates_or_trains(tmp_path: Path) -> None:
    # The README says the demo names a port in use "before it starts anything": on a fresh clone it simulated the
    # history and trained a model first (minutes), then said the port was in use.
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        printed = run_winback("demo", "--workdir", "demo", "--port", str(port), "--orders", "100", cwd=tmp_path)
    assert printed.exit_code != 0
    assert printed.stdout == ""
    assert printed.stderr.strip() == (
        f"error: port {port} on 127.0.0.1 is in use: stop what runs there or pass another --port "
        f'(make demo DEMO_ARGS="--port {port + 1}")'
    )
    assert not (tmp_path / "demo").exists()


def test_demo_on_a_history_too_short_to_train_on_says_so_in_one_line(tmp_path: Path) -> None:
    # `winback demo --orders 100` (the least --orders takes) printed a 74-line traceback ending in "ValueError: only
    # 25 silent retries fall in the training time slice", and kept the short history for the next run.
    printed = run_winback(
        "demo", "--workdir", "demo", "--orders", "100", "--episodes", "0", "--no-serve", "--live-orders", "0",
        cwd=tmp_path,
    )  # fmt: skip
    assert printed.exit_code != 0
    assert "Traceback" not in printed.stdout + printed.stderr
    error = " ".join(printed.stderr.split())
    assert error.startswith("error: only "), printed.stderr
    assert error.endswith(
        f"the history is too short to learn retryability (the demo trains on {tmp_path / 'demo' / 'history'}: "
        "`make clean`, or another --workdir, and more --orders simulate a new one)"
    ), printed.stderr


def test_demo_into_a_log_says_its_simulation_as_it_starts(tmp_path: Path) -> None:
    # Into a pipe or a file (`make demo > log`, CI) rich draws nothing of the simulation's bar while it runs: the
    # demo printed nothing until the simulation was over, while training says each step as it starts.
    printed = run_winback(
        "demo", "--workdir", "demo", "--orders", "100", "--seed", "4", "--episodes", "0", "--no-serve",
        "--live-orders", "0", cwd=tmp_path,
    )  # fmt: skip
    lines = printed.stdout.splitlines()
    assert lines[0] == "simulation: 100 failed orders, seed 4", printed.stdout
    assert lines[1].startswith("simulated 100 failed orders ("), printed.stdout
    assert "━" not in printed.stdout  # no bar drawn at its end either
    assert "training step 1/" in printed.stdout  # the next step, said the same way


def test_history_export_says_how_it_read_the_earlier_history(tmp_path: Path) -> None:
    # The earlier history's values are written as read (a clicked nudge marked undelivered, written delivered):
    # the export is the only command that could say so, and said nothing.
    from pipelines.simulate import simulate

    earlier = tmp_path / "earlier"
    simulate(earlier, orders=40, seed=3, progress=False)
    nudges = pd.read_parquet(earlier / "nudges.parquet")
    clicked = int(nudges.index[nudges["clicked_at"].notna()][0])
    nudges.loc[clicked, "delivered"] = False
    nudges.to_parquet(earlier / "nudges.parquet", index=False)
    url = _fresh_store(tmp_path)
    result = CliRunner().invoke(
        app, ["history", "export", "--out", str(tmp_path / "all"), "--database-url", url, "--with-history",
              str(earlier)], env={"COLUMNS": "1000"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.output.startswith(
        f"warning: {earlier / 'nudges.parquet'}:row {clicked + 1}: column delivered: delivered is false but"
    ), result.output


def test_history_export_says_a_warning_the_earlier_history_carries_into_its_files_once(tmp_path: Path) -> None:
    # The export reads its own files back before moving them in: their warnings named the hidden .partial-* files,
    # so they were not printed. Once printed, a warning the earlier history carries into the files came twice: of
    # EARLIER's row, then of the written file's. One order's third attempt in the earlier history says another
    # amount; the files written keep it, and it is said once, of EARLIER's row (where its producer fixes it).
    from pipelines.simulate import simulate

    earlier = tmp_path / "earlier"
    simulate(earlier, orders=40, seed=3, progress=False)
    attempts = pd.read_parquet(earlier / "attempts.parquet")
    changed = attempts.index[attempts["attempt_number"] == 3][0]
    order = attempts.loc[changed, "order_id"]
    attempts.loc[changed, "amount"] += 1.0
    attempts.to_parquet(earlier / "attempts.parquet", index=False)
    out, url = tmp_path / "all", _fresh_store(tmp_path)
    result = CliRunner().invoke(
        app, ["history", "export", "--out", str(out), "--database-url", url, "--with-history",
              str(earlier)], env={"COLUMNS": "1000"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    written = pd.read_parquet(out / "attempts.parquet")
    row = int(written.index[(written["order_id"] == order) & (written["attempt_number"] == 3)][0]) + 1
    assert f"{out / 'attempts.parquet'}:row {row}: column amount: " not in result.output, result.output
    assert result.output.count("column amount: ") == 1, result.output
    assert f"warning: {earlier / 'attempts.parquet'}:row {changed + 1}: column amount: " in result.output
    assert "... and" not in result.output  # the warning left out is not counted as one more either
    assert ".partial-" not in result.output
    # --with-history --out itself: the same file read, then written, said once too.
    again = CliRunner().invoke(
        app, ["history", "export", "--out", str(out), "--database-url", url, "--with-history",
              str(out)], env={"COLUMNS": "1000"},
    )  # fmt: skip
    assert again.exit_code == 0, again.output
    assert again.output.count("column amount: ") == 1, again.output
    assert f"warning: {out / 'attempts.parquet'}:row {row}: column amount: " in again.output


def test_history_export_with_history_writes_the_earlier_history_too_and_names_a_missing_one(tmp_path: Path) -> None:
    # The store holds only what was served since it started: an export for retraining had no way to carry the
    # history the champion was first trained on (a simulation, a switch's export), so `retrain` saw the new
    # orders alone.
    from pipelines.simulate import simulate

    earlier = tmp_path / "earlier"
    simulate(earlier, orders=40, seed=3, progress=False)
    url = _fresh_store(tmp_path)
    wide = {"COLUMNS": "1000"}
    out = tmp_path / "all"
    result = CliRunner().invoke(
        app, ["history", "export", "--out", str(out), "--database-url", url, "--with-history", str(earlier)], env=wide
    )
    assert result.exit_code == 0, result.output
    said = result.output.replace("\n", "")
    assert f"of which 40 orders from --with-history {earlier}" in said
    assert "".join(f"the files hold the orders of --with-history {earlier} only".split()) in "".join(said.split())
    written = read_history(out / "attempts.parquet", out / "nudges.parquet", stops_path=out / "stops.parquet")
    simulated = read_history(
        earlier / "attempts.parquet", earlier / "nudges.parquet", stops_path=earlier / "stops.parquet"
    )
    for name in ("attempts", "nudges", "stops"):
        assert len(getattr(written, name)) == len(getattr(simulated, name)) > 0, name
    # Into itself: the cron line's accumulating history stays the same when the store has nothing new.
    again = CliRunner().invoke(
        app, ["history", "export", "--out", str(out), "--database-url", url, "--with-history", str(out)], env=wide
    )
    assert again.exit_code == 0, again.output
    assert len(read_history(out / "attempts.parquet", out / "nudges.parquet").attempts) == len(simulated.attempts)
    missing = CliRunner().invoke(
        app, ["history", "export", "--out", str(tmp_path / "x"), "--database-url", url, "--with-history",
              str(tmp_path / "nowhere")], env=wide,
    )  # fmt: skip
    assert missing.exit_code == 2
    assert (
        f"no history in {tmp_path / 'nowhere'}: it needs attempts.parquet and nudges.parquet"
        in missing.output.replace("\n", "")
    )

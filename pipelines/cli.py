"""The `winback` command line: the one composition root of the project (CONTRACT.md section 1)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from typer.core import TyperGroup, TyperOption

from model.wording import count_noun, utc_second

if TYPE_CHECKING:
    import pandas as pd
    from typer._click.core import Command, Context
    from typer._click.formatting import HelpFormatter

    from model.catalog import ErrorCatalog
    from model.registry import TrainedVersion
    from service.executor.by_hand import CaseDone


def _flags_read_as_flags(command: Command, ctx: Context) -> None:
    """Show ``command``'s flags (``--promote``, ``--serve/--no-serve``, ``--help``) bare in its help: Typer 0.29
    prints the type of every option beside it, ``<bool>`` for a flag too, as if it took a value. A bounded number
    reads ``<int> [x>=1]``, not ``<int range> [x>=1]``: the type column is as wide as its widest entry, and at 80
    columns the help beside it had too little room for a URL, which Typer then cut with "…"."""
    for param in command.get_params(ctx):
        if not isinstance(param, TyperOption) or param.metavar is not None:
            continue
        if param.is_flag:
            param.metavar = ""  # what the help shows in place of the type
        elif param.type_descriptor.is_ranged:
            param.metavar = f"<{param.type_descriptor.ranged_type_name}>"


def _help_in_paragraphs(command: Command) -> None:
    """Join the single line breaks of ``command``'s help text, so each paragraph is wrapped to the terminal: Typer
    0.29 keeps a docstring's source lines in its help, which showed as ragged lines at any width ("... with the
    history's stops" over "file, the points where ...", a line of "a" alone at 100 columns)."""
    if command.help and "\b" not in command.help:
        paragraphs = inspect.cleandoc(command.help).split("\n\n")
        command.help = "\n\n".join(" ".join(paragraph.split()) for paragraph in paragraphs)


class Group(TyperGroup):
    """The ``winback`` command and its groups: their flags, and their commands' flags, read as flags in the help,
    and their help text in whole paragraphs."""

    def format_help(self, ctx: Context, formatter: HelpFormatter) -> None:
        _flags_read_as_flags(self, ctx)
        _help_in_paragraphs(self)
        super().format_help(ctx, formatter)

    def get_command(self, ctx: Context, cmd_name: str) -> Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _flags_read_as_flags(command, ctx)
            _help_in_paragraphs(command)
        return command


app = typer.Typer(
    cls=Group,
    name="winback",
    help="ML-driven payment recovery: simulate histories, train, evaluate, serve and execute decisions.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


@app.callback()
def main() -> None:
    """winback: decide, at failure time, whether to retry, retarget or stop — and learn from what happened."""
    import os

    from service.signals import restore_sigchld_default

    # MLflow's INFO lines ("Creating initial MLflow database tables...", "Validating input example against model
    # signature") came between winback's own lines and read as errors; its warnings still show. MLflow reads its
    # documented MLFLOW_LOGGING_LEVEL when it is imported; a caller's own value wins.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # A process that imported MLflow before the command ran (a notebook or a test calling the CLI in-process) has
    # its logger at INFO already, and a new store said "Creating initial MLflow database tables..." and "Updating
    # database tables" (mlflow.store.db.utils) between the command's lines: its level follows the variable too.
    quiet_mlflow_logger(os.environ["MLFLOW_LOGGING_LEVEL"])

    # Before any command starts a child: an ignored SIGCHLD inherited from whatever started this one would make
    # every child's exit unreadable (service/signals.py).
    restore_sigchld_default()


def quiet_mlflow_logger(level: str) -> None:
    """Set the ``mlflow`` logger to ``level`` (MLFLOW_LOGGING_LEVEL's value), as MLflow does when it is imported; a
    level logging does not know is left to MLflow to refuse, as it would have."""
    import contextlib
    import logging

    with contextlib.suppress(ValueError):
        logging.getLogger("mlflow").setLevel(level.strip().upper())


def fail(message: str) -> typer.Exit:
    """Print a one-line reason on stderr and return the exit to raise (code 2)."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


def output_folder(path: Path, option: str, named: Path | None = None) -> None:
    """Refuse, before any work, an output folder that is a file, lies under one, or cannot be written (one line,
    naming the option's path ``named``, by default ``path``; not a traceback from the first write after minutes
    of work). Nothing is left behind: the command makes the folder when it writes."""
    named = named or path
    for found in (path, *path.parents):
        if found.exists():
            if not found.is_dir():
                where = "is a file" if found == named else f"is under {found}, a file"
                raise fail(f"{option} {named} {where}: name a folder")
            writable_folder(found, named, option)
            return


def writable_folder(folder: Path, path: Path, option: str) -> None:
    """Make and remove a folder in ``folder``, the part of ``path`` that exists: permissions alone do not say
    whether it can be written (root may write anywhere by them, yet not in /proc, nor on a read-only mount)."""
    import tempfile

    try:
        Path(tempfile.mkdtemp(prefix=".winback-probe-", dir=folder)).rmdir()
    except OSError as exc:
        raise fail(f"{option} {path}: cannot write in {folder}: {exc.strerror or exc}") from None


def output_file(path: Path, option: str) -> None:
    """Refuse, before any work, an output file that is a folder or lies under a file."""
    if path.is_dir():
        raise fail(f"{option} {path} is a folder: name the file to write")
    output_folder(path.parent, option, named=path)


def readable_inputs(*inputs: tuple[str, Path | None]) -> None:
    """Refuse, before any work, the input files (option, path; None: not given) that are not there or cannot be
    read, every one of them in one line: naming only the first had the user fix and rerun once per file. A
    .parquet path may be a folder of parts; other folders are refused. What a file holds is the reader's to say."""
    problems = []
    for option, path in inputs:
        if path is None:
            continue
        reason = None
        if not path.exists():
            reason = "no such file"
        elif path.is_dir() and path.suffix.lower() != ".parquet":
            reason = "a folder, not a file"
        else:
            try:
                if path.is_dir():
                    next(path.iterdir(), None)
                else:
                    path.open("rb").close()
            except OSError as exc:
                reason = f"cannot read it: {exc.strerror or exc}"
        if reason is not None:
            problems.append(f"{option} {path}: {reason}")
    if problems:
        raise fail("; ".join(problems))


def history_with_attempts(attempts: Path, nudges: Path, stops: Path | None = None) -> None:
    """Refuse, before any work, a history whose attempts file holds only a header, naming it (and the other files
    without rows): evaluate left an MLflow store and its folder behind before failing. (`codes report` answers such
    a history that it has no error code to report, exit 0: the README's step after an export of a fresh store.)"""
    from model.history import HistoryError, refuse_a_history_without_attempts
    from pipelines.train import format_history_error

    try:
        refuse_a_history_without_attempts(attempts, nudges, stops)
    except HistoryError as exc:
        raise fail(format_history_error(exc)) from None


def usable_database_url(database_url: str | None) -> str:
    """The database a command uses: ``--database-url``, else ``$WINBACK_DATABASE_URL``, else ``sqlite:///winback.db``
    here; refused in one line, its password hidden, when no engine can be built for it (``bogus://``, a driver
    that is not installed: SQLAlchemy's traceback before), before the command does anything."""
    import os
    import warnings

    from sqlalchemy.exc import SAWarning

    from service.migrations import UnusableDatabaseError, engine_for

    url = database_url or os.environ.get("WINBACK_DATABASE_URL") or "sqlite:///winback.db"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SAWarning)  # said once, by the engine the command then builds
            engine_for(url).dispose()  # builds the engine only: connects to nothing, creates no file
    except UnusableDatabaseError as exc:
        raise fail(str(exc)) from None
    return url


def known_alias(alias: str, tracking_uri: str | None) -> None:
    """Refuse, before any work, an ``--alias`` no version of a registered ``winback`` has: a mistyped one
    (``challanger``) was evaluated as rules-only, exit 0, said to be "no model registered". Without ``champion`` the
    scorer serves rules-only, and so is it evaluated; so is a store where nothing is registered yet."""
    from mlflow.exceptions import MlflowException

    from model.registry_client import CHAMPION, RegistryError, registered_aliases, resolve_tracking_uri, unusable_store

    uri = resolve_tracking_uri(tracking_uri)
    try:
        aliases = registered_aliases(tracking_uri=uri)
    except RegistryError as exc:  # a store this install cannot use: already the one line
        raise fail(str(exc)) from None
    except MlflowException as exc:
        # An unknown scheme (`bogus://`, `postgres://`) ended evaluate in MLflow's traceback, after reading the history.
        raise fail(unusable_store(uri, exc)) from None
    if aliases is None or alias in aliases or alias == CHAMPION:
        return
    known = ", ".join(f"{name} -> version {version}" for name, version in sorted(aliases.items())) or "none"
    raise fail(f"--alias {alias}: no version of winback has this alias (its aliases: {known})")


@app.command()
def simulate(
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="Folder for attempts.parquet, nudges.parquet and stops.parquet (the logged stop decisions)."
        ),
    ],
    orders: Annotated[int, typer.Option("--orders", min=1, help="Failed orders to simulate.")] = 20_000,
    seed: Annotated[int, typer.Option("--seed", help="Random seed; the same seed gives the same files.")] = 1,
) -> None:
    """Write a realistic synthetic history of failed payments (CONTRACT.md section 3)."""
    from pipelines.simulate import simulate as run_simulation

    output_folder(out, "--out")
    summary = run_simulation(out, orders=orders, seed=seed, progress=True)
    rate = (
        f"{summary.orders_per_second:,.0f}" if summary.orders_per_second >= 10 else f"{summary.orders_per_second:.2g}"
    )
    console.print(
        f"wrote {summary.attempts_path} ({count_noun(summary.attempts, 'attempt')}), {summary.nudges_path} "
        f"({count_noun(summary.nudges, 'nudge')}) and {summary.stops_path} ({count_noun(summary.stops, 'stop')}): "
        f"{count_noun(summary.orders, 'failed order')} in {summary.seconds:.1f} s ({rate} orders/s)",
        highlight=False,
    )
    print_frame(summary.failure_mix, "failure mix and logging-policy recovery")


def print_frame(frame: pd.DataFrame, title: str) -> None:
    """A small DataFrame as a rich table (floats rounded) that reads at 80 columns: a long column name folds at its
    underscores, a number is never broken (at 80 columns, "16,373.307" printed as "16,373." over "307")."""
    from rich.text import Text

    from pipelines.tables import compact_table, figure, folded_header, print_titled

    table = compact_table("")
    table.add_column(str(frame.index.name or ""), no_wrap=True)
    for column in frame.columns:
        table.add_column(folded_header(str(column)), justify="right", no_wrap=True)
    columns = [frame[c].tolist() for c in frame.columns]
    for position, index in enumerate(frame.index):
        cells = [figure(col[position], ".3f" if isinstance(col[position], float) else "") for col in columns]
        table.add_row(Text(str(index)), *(Text(cell) for cell in cells))
    print_titled(console, title, table)


#: ``train``, ``evaluate`` and ``retrain``: the history's optional stops file.
StopsOption = Annotated[
    Path | None,
    typer.Option(
        "--stops",
        help="Logged stop decisions (.parquet or .csv; the optional stops file of the history). Default: "
        "stops.parquet or stops.csv beside --attempts, when there is one. Without it the off-policy estimates "
        "leave out the decision points where the logging policy stopped (and say so).",
    ),
]

#: ``train`` and ``retrain``: whether the registered version's text model is refit on the whole history.
RefitOption = Annotated[
    bool,
    typer.Option(
        "--refit/--no-refit",
        help="Refit the registered version's text model and code inventory on the whole history once judged "
        "(default: last week's error codes are learned), or register the judged fit itself.",
    ),
]

#: ``train`` and ``retrain``: the promotion gate's non-inferiority margin of the policy value. Its default is
#: ``pipelines.gate.DEFAULT_POLICY_VALUE_MARGIN`` (not imported here: the CLI starts without numpy and pandas).
PolicyValueMarginOption = Annotated[
    float,
    typer.Option(
        "--gate-margin",
        help="The promotion gate's margin: the challenger is promoted only when its policy value is shown (one-sided, "
        "at 5%) not worse than the champion's by more than this share of the champion's value (0 to below 1).",
    ),
]


@app.command()
def train(
    attempts: Annotated[Path, typer.Option("--attempts", help="Attempts history (.parquet or .csv).")],
    nudges: Annotated[Path, typer.Option("--nudges", help="Nudges history (.parquet or .csv).")],
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            "--tracking-uri",
            help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the SQLite file mlruns/mlflow.db here).",
        ),
    ] = None,
    promote: Annotated[
        bool, typer.Option("--promote", help="Move alias champion to the new version if it passes the gate.")
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Random seed of training and evaluation.")] = 0,
    config: Annotated[
        Path | None, typer.Option("--config", help="Merchant config for replaying policies (default: demo config).")
    ] = None,
    episodes: Annotated[
        int | None,
        typer.Option("--episodes", min=0, help="Simulator orders per policy in the evaluation (default: 2000)."),
    ] = None,
    engine: Annotated[
        str,
        typer.Option("--engine", help="Where to fit the boosters: local (this process) or dask (lightgbm.dask)."),
    ] = "local",
    scheduler: Annotated[
        str | None,
        typer.Option("--scheduler", help="Dask scheduler address for --engine dask, e.g. tcp://10.0.0.5:8786."),
    ] = None,
    partition_rows: Annotated[
        int,
        typer.Option(
            "--partition-rows",
            min=1,
            help="Attempts per partition of whole orders: larger histories are validated and trained on one "
            "partition at a time (memory per partition: a few GB per 500,000 attempts).",
        ),
    ] = 500_000,
    threads: Annotated[
        int,
        typer.Option(
            "--threads",
            min=1,
            help="LightGBM threads, and processes building the partitions' decision points (1 is safest on a "
            "machine shared with other jobs).",
        ),
    ] = 1,
    refit: RefitOption = True,
    stops: StopsOption = None,
    policy_value_margin: PolicyValueMarginOption = 0.05,
) -> None:
    """Validate the history, train, evaluate, log to MLflow and register `winback` (alias challenger)."""
    from pipelines.train import train_command

    readable_inputs(("--attempts", attempts), ("--nudges", nudges), ("--stops", stops), ("--config", config))

    code = train_command(
        attempts,
        nudges,
        tracking_uri,
        promote,
        stops=stops,
        seed=seed,
        config=config,
        episodes=episodes,
        engine=engine,
        scheduler=scheduler,
        partition_rows=partition_rows,
        threads=threads,
        refit=refit,
        console=console,
        err_console=err_console,
        policy_value_margin=policy_value_margin,
    )
    if code:
        raise typer.Exit(code=code)


TrackingUriOption = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the SQLite file mlruns/mlflow.db here).",
    ),
]
ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="Merchant config YAML (default: the shipped demo config).")
]


@app.command()
def serve(
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Server processes.")] = 1,
    config: ConfigOption = None,
    tracking_uri: TrackingUriOption = None,
) -> None:
    """Serve the decision API (and the executor's endpoints), following models:/winback@champion."""
    from model.merchant_config import ConfigError
    from model.registry_client import RegistryError
    from service.api.server import PortInUseError, SpoolUnwritableError, run
    from service.api.settings import SettingsError
    from service.api.startup import WorkerStartupError
    from service.migrations import UnusableDatabaseError

    try:
        run(host=host, port=port, workers=workers, config_path=config, tracking_uri=tracking_uri)
    except (
        ConfigError,
        PortInUseError,
        RegistryError,
        SettingsError,
        SpoolUnwritableError,
        UnusableDatabaseError,
        WorkerStartupError,
    ) as exc:
        raise fail(str(exc)) from None


executor_app = typer.Typer(cls=Group, help="The executor: performs retries and nudges from the durable schedule.")
app.add_typer(executor_app, name="executor")


@executor_app.command("run")
def executor_run(
    workers: Annotated[int, typer.Option("--workers", min=1, help="Worker processes claiming due actions.")] = 1,
    config: ConfigOption = None,
    tracking_uri: TrackingUriOption = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            help="Database (default: $WINBACK_DATABASE_URL, else sqlite:///winback.db here). SQLite serves one "
            "machine (its workers take turns on the write lock); PostgreSQL lets workers on several machines claim "
            "in parallel.",
        ),
    ] = None,
    stop_after: Annotated[
        float | None, typer.Option("--stop-after", min=0, help="Stop after this many seconds (default: run until ^C).")
    ] = None,
) -> None:
    """Run executor workers against the shared database (CONTRACT.md section 5) until stopped."""

    from model.merchant_config import ConfigError
    from model.registry_client import RegistryError, refuse_a_store_that_cannot_work
    from service.api.settings import default_tracking_uri
    from service.executor.worker import run
    from service.migrations import UnusableDatabaseError

    url = usable_database_url(database_url)
    # The same default as `winback serve` (CONTRACT.md section 1): the executor decides with the champion too.
    uri = tracking_uri or default_tracking_uri()
    try:
        # As serve: `bogus://x` or `mysql://` without its driver decided rules-only for ever; a store that is down
        # is not refused.
        refuse_a_store_that_cannot_work(uri)
        run(url, workers=workers, config_path=config, tracking_uri=uri, stop_after=stop_after)
    except (ConfigError, RegistryError, UnusableDatabaseError, ValueError) as exc:
        raise fail(str(exc)) from None


@executor_app.command("resolve-charge")
def executor_resolve_charge(
    action_id: Annotated[
        int,
        # A database id (PostgreSQL's bigint): a larger one is no action, and SQLite's driver raised OverflowError.
        typer.Argument(min=1, max=2**63 - 1, help="The dead-lettered charge action (unanswered_since is set)."),
    ],
    charged: Annotated[
        bool,
        typer.Option(
            "--charged/--not-charged", help="What the connector says it did with this payment id (ask it first)."
        ),
    ],
    config: ConfigOption = None,
    tracking_uri: TrackingUriOption = None,
    database_url: Annotated[
        str | None,
        typer.Option("--database-url", help="Database (default: $WINBACK_DATABASE_URL, else sqlite:///winback.db)."),
    ] = None,
) -> None:
    """Record an operator's answer for a charge that was sent and never answered, which holds its order's other
    charges back: --charged records the attempt as a success, --not-charged frees the order to be charged again."""

    from model.merchant_config import ConfigError
    from service.api.settings import default_tracking_uri
    from service.executor.core import ChargeResolutionError
    from service.executor.worker import resolve_charge

    url = usable_database_url(database_url)
    try:
        state = resolve_charge(url, action_id, charged, config, tracking_uri or default_tracking_uri())
    except (ConfigError, ChargeResolutionError, ValueError) as exc:
        raise fail(str(exc)) from None
    typer.echo(f"action {action_id}: {'charged' if charged else 'not charged'}; the order is {state}")


@executor_app.command("charge-disputes")
def executor_charge_disputes(
    merchant: Annotated[str | None, typer.Option("--merchant", help="Only this merchant's (default: all).")] = None,
    resolve: Annotated[
        str | None,
        typer.Option(
            "--resolve",
            metavar="ORDER_ID",
            help="Mark the order's open disputes as dealt with (with --note; --merchant when another merchant has an "
            "order of that id).",
        ),
    ] = None,
    note: Annotated[
        str | None,
        typer.Option("--note", help='With --resolve: what was done, e.g. "fulfilment held, customer charged by hand".'),
    ] = None,
    by: Annotated[
        str | None, typer.Option("--by", help="With --resolve: who dealt with it (default: your user name).")
    ] = None,
    show_all: Annotated[
        bool, typer.Option("--all", help="List the disputes dealt with too, with who, when and their note.")
    ] = False,
    database_url: Annotated[
        str | None,
        typer.Option("--database-url", help="Database (default: $WINBACK_DATABASE_URL, else sqlite:///winback.db)."),
    ] = None,
) -> None:
    """List the open charge disputes: charges recorded as charged on an operator's word (resolve-charge --charged,
    or the console), or reported paid by the merchant (its payment-succeeded naming winback's payment), that their
    switch then reported declined, or not found twice. The merchant was told the order succeeded on money the
    switch does not have (or, on an order paid before, its history records a payment that was not made), so each
    needs taking up with the merchant; --resolve ORDER_ID --note TEXT marks it dealt with; marking one again
    changes nothing."""
    from service.executor.by_hand import already_done
    from service.executor.core import ChargeResolutionError, DisputeResolutionError
    from service.executor.worker import list_charge_disputes, resolve_charge_dispute

    url = usable_database_url(database_url)
    if resolve is None and (note is not None or by is not None):
        raise fail("--note and --by go with --resolve ORDER_ID")
    if resolve is not None:
        who = f"operator {resolver(note, by, show_all, 'disputes', 'fulfilment held, customer charged by hand')}"
        try:
            marked = resolve_charge_dispute(url, resolve, note or "", who, merchant)
        except (ChargeResolutionError, DisputeResolutionError, ValueError) as exc:
            raise fail(str(exc)) from None
        for dispute in marked.now:
            typer.echo(
                f"{dispute.merchant_id} {dispute.order_id}: the dispute of payment {dispute.payment_id} "
                f"({dispute.switch_said}) is marked dealt with by {dispute.resolved_by}: {dispute.resolution_note}"
            )
        if not marked.now:
            typer.echo(already_done(marked.before, resolve, utc_second))
        return
    try:
        found = list_charge_disputes(url, merchant)
    except (ChargeResolutionError, ValueError) as exc:
        raise fail(str(exc)) from None
    shown = found if show_all else [dispute for dispute in found if dispute.open]
    if not found:
        typer.echo("no charge disputed by its switch after an operator's answer or a merchant's report")
        return
    if not shown:
        typer.echo(f"no charge dispute open ({count_noun(len(found), 'dispute')} dealt with: --all lists them)")
        return
    for dispute in shown:  # one line each, whole (a table folds ids at 80 columns), for people and grep alike
        line = (
            f"{dispute.merchant_id} {dispute.order_id} ({dispute.order_state}): payment {dispute.payment_id} via "
            f"{dispute.connector}: {dispute.who_said}, the switch says {dispute.switch_said}; flagged "
            f"{utc_second(dispute.flagged_at)}"
        )
        if not dispute.open:
            when = utc_second(dispute.resolved_at) if dispute.resolved_at else ""
            line += f"; dealt with by {dispute.resolved_by} at {when}: {dispute.resolution_note}"
        typer.echo(line)


#: What ``refunds-by-hand`` lists, in the words of its lines ("possibly paid twice", "possibly charged"), for the
#: lines saying there is none: they named refunds and possible double payments only, not the charges taken as never
#: charged whose switch went silent that it lists too.
CASES_BY_HAND = "refund by hand, possible double payment or possibly charged payment"
#: What a listed case says for an amount its payload has none readable of (an older release's, one edited by hand).
AMOUNT_NOT_RECORDED = "amount not recorded"


@executor_app.command("refunds-by-hand")
def executor_refunds_by_hand(
    merchant: Annotated[str | None, typer.Option("--merchant", help="Only this merchant's (default: all).")] = None,
    resolve: Annotated[
        str | None,
        typer.Option(
            "--resolve",
            metavar="ORDER_ID",
            help="Mark the order's open cases as dealt with (with --note; --merchant when another merchant has an "
            "order of that id).",
        ),
    ] = None,
    note: Annotated[
        str | None,
        typer.Option("--note", help='With --resolve: what was done, e.g. "refunded by hand on the switch".'),
    ] = None,
    by: Annotated[
        str | None, typer.Option("--by", help="With --resolve: who dealt with it (default: your user name).")
    ] = None,
    show_all: Annotated[
        bool, typer.Option("--all", help="List the cases dealt with too, with who, when and their note.")
    ] = False,
    database_url: Annotated[
        str | None,
        typer.Option("--database-url", help="Database (default: $WINBACK_DATABASE_URL, else sqlite:///winback.db)."),
    ] = None,
) -> None:
    """List the refunds of duplicate charges given to an operator to make by hand: the switch refused them or never
    answered them, or never answered a status check of a charge recorded as charged on an operator's word within a
    day. Each line says why, since when and what is known of the charge; a cancelled one was found unneeded later.
    Then the orders paid by winback's charge that their merchant reported paid by a payment of its own too: the
    customer may have paid twice, and winback refunds neither. And the charges taken as never charged whose switch
    then answered no status check for a day: check with the connector whether it took them. --resolve ORDER_ID
    --note TEXT marks the order's cases dealt with; marking one again changes nothing."""
    from service.executor.by_hand import CaseResolutionError, already_done
    from service.executor.core import ChargeResolutionError, DisputeResolutionError, refund_why
    from service.executor.worker import list_refunds_by_hand, resolve_case_by_hand

    url = usable_database_url(database_url)
    if resolve is not None:
        who = f"operator {resolver(note, by, show_all, 'refunds by hand', 'refunded by hand on the switch')}"
        try:
            marked = resolve_case_by_hand(url, resolve, note or "", who, merchant)
        except (ChargeResolutionError, DisputeResolutionError, CaseResolutionError) as exc:
            raise fail(str(exc)) from None
        for case in marked.now:
            typer.echo(f"{case.merchant_id} {case.order_id}: {case.described()} is marked dealt with by {who}: {note}")
        if not marked.now:
            typer.echo(already_done(marked.before, resolve, utc_second))
        return
    if note is not None or by is not None:
        raise fail("--note and --by go with --resolve ORDER_ID")
    try:
        found, twice, silent = list_refunds_by_hand(url, merchant)
    except (ChargeResolutionError, ValueError) as exc:
        raise fail(str(exc)) from None
    shown_twice = [paid for paid in twice if show_all or paid.open]
    shown = [refund for refund in found if show_all or refund.open]
    shown_silent = [charge for charge in silent if show_all or charge.open]
    for paid in shown_twice:  # first: nothing is in hand for these, not even a refund refused
        typer.echo(
            f"{paid.merchant_id} {paid.order_id} ({paid.order_state}): possibly paid twice: winback's payment "
            f"{paid.payment_id} via {paid.connector} (txn_id {paid.winback_txn_id}) paid it, "
            f"{written_money(paid.amount, paid.currency)}, and the merchant reported its own txn_id "
            f"{paid.merchant_txn_id} at {utc_second(paid.reported_at)}: nothing refunded, check with the merchant"
            f"{dealt_with(paid.done)}"
        )
    for charge in shown_silent:  # then: the customer may have paid, and nothing else will show it
        typer.echo(
            f"{charge.merchant_id} {charge.order_id} ({charge.order_state}): possibly charged: payment "
            f"{charge.payment_id} via {charge.connector}, {written_money(charge.amount, charge.currency)}, taken as "
            f"never charged (charge action {charge.charge_action_id}); its switch silent since "
            f"{utc_second(charge.silent_since)}, asked no more at {utc_second(charge.given_up_at)}: check with the "
            f"connector{dealt_with(charge.done)}"
        )
    for refund in shown:  # one line each, whole (a table folds ids at 80 columns), for people and grep alike
        typer.echo(
            f"{refund.merchant_id} {refund.order_id} ({refund.order_state}): refund action {refund.refund_action_id} "
            f"of payment {refund.payment_id} via {refund.connector}, {written_money(refund.amount, refund.currency)}: "
            f"{refund.state}, given to an operator at {utc_second(refund.handed_at)} ({refund_why(refund.why)}): "
            f"{refund.note}"
            f"{dealt_with(refund.done)}"
        )
    if not found and not twice and not silent:
        typer.echo(f"no {CASES_BY_HAND} given to an operator")
    elif not shown and not shown_twice and not shown_silent:
        cases = count_noun(len(found) + len(twice) + len(silent), "case")
        typer.echo(f"no {CASES_BY_HAND} open ({cases} dealt with: --all lists them)")


def resolver(note: str | None, by: str | None, show_all: bool, listed: str, example: str) -> str:
    """Who marks a case dealt with (``--by``, else the user's name), once ``--resolve``'s options are checked:
    ``--note`` given, ``--all`` not (it lists the ``listed`` cases)."""
    import getpass

    if show_all:
        raise fail(f"--all lists the {listed}: run it without --resolve")
    if note is None:
        raise fail(f'--resolve needs --note saying what was done, e.g. "{example}"')
    if by is not None and by.strip():
        return by.strip()
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name in the environment or the password database
        raise fail("name who dealt with it: --by NAME") from None


def dealt_with(done: CaseDone | None) -> str:
    """A listed case's end of line once it is dealt with: who, when, and their note ('' while open)."""
    return "" if done is None else f"; dealt with by {done.by} at {utc_second(done.at)}: {done.note}"


def written_money(amount: float | None, currency: str | None) -> str:
    """``₹1,499.00``, ``¥1,200``, ``1,234.500 KWD``: a listed case's amount as the console writes it, not as stored
    (``499.0 INR``); "amount not recorded" for a case whose payload has none readable, as its console card says."""
    from model.money import format_money

    return AMOUNT_NOT_RECORDED if amount is None or currency is None else format_money(amount, currency)


@executor_app.command("callback-url")
def executor_callback_url(
    merchant: Annotated[str, typer.Option("--merchant", help="The merchant whose callback URLs to print.")],
    provider: Annotated[
        str | None,
        typer.Option(
            "--provider",
            help="gupshup, interakt, karix, push_webhook or fake (default: those the merchant's config names; the "
            "shipped demo config names none, so name one).",
        ),
    ] = None,
    base_url: Annotated[
        str | None,
        typer.Option("--base-url", help="Where providers reach the scorer (default: $WINBACK_PUBLIC_BASE_URL)."),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Print the URLs to configure at the merchant's providers for customers' replies (STOP) and delivery
    receipts; each carries the merchant's callback token (from $WINBACK_PROVIDER_CALLBACK_SECRET, else
    $WINBACK_LINK_SECRET), so the same secret must be set where `winback serve` runs; after a rotation it prints
    the new URLs, while the previous secret (`*_PREVIOUS`) keeps the old ones working until they are replaced."""
    from model.merchant_config import ConfigError, load_config
    from service.api.settings import DEMO_CONFIG, SettingsError, settings_from_env
    from service.executor.channels.inbound import PROVIDERS
    from service.executor.optouts import callback_urls
    from service.executor.settings import ExecutorSettings

    try:
        merchants = load_config(config or DEMO_CONFIG).merchants
        settings = settings_from_env(ExecutorSettings)
    except (ConfigError, SettingsError) as exc:
        raise fail(str(exc)) from None
    if merchant not in merchants:
        raise fail(f"unknown merchant {merchant!r}: one of {sorted(merchants)}")
    if provider is not None and provider not in PROVIDERS:
        raise fail(f"unknown provider {provider!r}: one of {sorted(PROVIDERS)}")
    kinds = [provider] if provider else sorted({p.kind for p in merchants[merchant].providers.values()} & PROVIDERS)
    if not kinds:
        raise fail(
            f"merchant {merchant!r} has no channel provider with callbacks in its config: name the one you configure "
            f"with --provider ({', '.join(sorted(PROVIDERS))}), e.g. --provider gupshup"
        )
    key = settings.callback_key()
    for kind in kinds:
        for what, url in callback_urls(base_url or settings.public_base_url, key, merchant, kind).items():
            typer.echo(f"{kind} {what}: {url}")


@app.command()
def evaluate(
    attempts: Annotated[Path, typer.Option("--attempts", help="Attempts history (.parquet or .csv).")],
    nudges: Annotated[Path, typer.Option("--nudges", help="Nudges history (.parquet or .csv).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for evaluation.md, CSV tables and plots.")],
    tracking_uri: TrackingUriOption = None,
    alias: Annotated[str, typer.Option("--alias", help="Registry alias of the model to evaluate.")] = "champion",
    config: ConfigOption = None,
    episodes: Annotated[
        int, typer.Option("--episodes", min=0, help="Simulator orders per policy (simulated histories only).")
    ] = 2_000,
    max_points: Annotated[int, typer.Option("--max-points", min=100, help="Holdout decision points replayed.")] = 5_000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of replays and episodes.")] = 0,
    stops: StopsOption = None,
) -> None:
    """Evaluate the registered model against the logging policy and two rule baselines.

    Holdout metrics per model and error class, off-policy estimates (IPS, SNIPS, DR; with the history's stops
    file, the points where the logging policy stopped count too) and, for a simulated history, simulator episodes
    side by side (recovered GMV, costs, nudges, rule violations).
    """
    from model.history import HistoryError
    from model.merchant_config import ConfigError
    from model.registry import RegistryError, load_trained_alias, resolve_tracking_uri
    from pipelines.evaluate import evaluate as run_evaluation
    from pipelines.train import (
        comparison_policies,
        format_history_error,
        merchants_for,
        print_history_warnings,
        resolve_stops,
    )

    readable_inputs(("--attempts", attempts), ("--nudges", nudges), ("--stops", stops), ("--config", config))
    output_folder(out, "--out")
    stops_file = resolve_stops(attempts, stops)
    history_with_attempts(attempts, nudges, stops_file)
    known_alias(alias, tracking_uri)
    if stops is None and stops_file is not None:
        console.print(f"logged stops: {stops_file} (beside --attempts)", highlight=False, soft_wrap=True)
    try:
        from model.history import read_history

        history = read_history(attempts, nudges, stops_path=stops_file)
        print_history_warnings(console, history.warnings)
        merchants = merchants_for(history.attempts, config)
        loaded = load_trained_alias(alias, tracking_uri=resolve_tracking_uri(tracking_uri))
        name = f"winback@{alias}" if loaded else "rules-only"
        catalog = say_evaluation_catalog(loaded)
        policies, scorers = comparison_policies(
            merchants, {name: loaded.bundle if loaded else None}, seed=seed, catalog=catalog
        )
        summary = run_evaluation(
            attempts,
            nudges,
            out,
            policies,
            scorers=scorers,
            episode_orders=episodes,
            simulated=None if episodes else False,
            max_points=max_points,
            seed=seed,
            stops_path=stops_file,
            catalog=catalog,
            history=history,
        )
    except (HistoryError, ConfigError, FileNotFoundError, ValueError, RegistryError) as exc:
        raise fail(format_history_error(exc) if isinstance(exc, HistoryError) else str(exc)) from None
    console.print(f"evaluation of {name} written to {summary.out_dir / 'evaluation.md'}")
    from pipelines.evaluate import fitted_on_holdout
    from pipelines.tables import print_note

    if summary.stops_note:
        print_note(console, summary.stops_note, "note:")
    if loaded and (warning := fitted_on_holdout(loaded.bundle.metadata, summary.holdout_start)):
        print_note(console, warning, "warning:")
    if summary.episodes is not None:
        print_frame(
            episodes_shown(summary.episodes),
            f"simulated episodes: {episodes:,} orders per policy (all of it in {summary.out_dir / 'evaluation.md'})",
        )


def say_evaluation_catalog(loaded: TrainedVersion | None) -> ErrorCatalog:
    """The error catalog an offline evaluation of ``loaded`` (None: rules only) reads (`registry.offline_catalog`),
    said in one line, and one more when ``WINBACK_GSM_OVERLAY`` names an overlay it is not evaluated with."""
    from model.registry import offline_catalog

    catalog, lines = offline_catalog(loaded)
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True, markup=False)
    return catalog


def episodes_shown(episodes: pd.DataFrame) -> pd.DataFrame:
    """The simulated episodes (a row per policy) as `winback evaluate` prints them: one column per policy (a row
    per policy has 13 columns, each wrapped over three lines at 80 columns), money in cents ("22,889.05", not
    "22,889.054"), other floats to 3 decimals. Formatted before turning: a turned frame's columns mix counts and
    rates, and its counts would print as floats."""
    from pipelines.tables import figure

    by_policy = episodes.set_index("policy")
    shown: pd.DataFrame = by_policy.apply(
        lambda column: column.map(
            str
            if column.dtype.kind != "f"
            else (lambda value: figure(value, ",.2f"))
            if str(column.name).endswith("_usd")
            else (lambda value: figure(value, ",.3f"))
        )
    )
    return shown.T.rename_axis("simulated episodes")


@app.command()
def demo(
    workdir: Annotated[
        Path, typer.Option("--workdir", help="Folder for the demo's history, MLflow store, database.")
    ] = Path("demo"),
    orders: Annotated[int, typer.Option("--orders", min=100, help="Failed orders to simulate.")] = 5_000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the simulation and training.")] = 1,
    episodes: Annotated[int, typer.Option("--episodes", min=0, help="Simulator orders per policy.")] = 500,
    host: Annotated[str, typer.Option("--host", help="Address the services listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port the services listen on.")] = 8000,
    serve_after: Annotated[
        bool,
        typer.Option("--serve/--no-serve", help="Keep the loop and services running until Ctrl-C (else: bounded)."),
    ] = True,
    live_orders: Annotated[
        int, typer.Option("--live-orders", min=0, help="Failed payments posted to the live loop (0: no loop).")
    ] = 40,
    live_seconds: Annotated[
        float,
        typer.Option(
            "--live-seconds", min=1, help="How long the loop runs with --no-serve (--serve: when to print a summary)."
        ),
    ] = 60.0,
    clock_speed: Annotated[
        float,
        typer.Option("--clock-speed", min=1, help="Executor demo-clock seconds per real second (1: real time)."),
    ] = 3600.0,
    pay_share: Annotated[
        float, typer.Option("--pay-share", min=0, max=1, help="Share of customers who pay the link they get.")
    ] = 0.6,
) -> None:
    """Simulate a history, train and promote a model, then run the recovery loop end to end on local fakes.

    Starts the sandbox connector, fake WhatsApp/SMS/e-mail/push providers, a webhook receiver, the API and an
    executor worker; posts failed payments, plays the customers (pays some links) and prints what happened.
    """
    import sys
    import uuid

    from pipelines.demo import demo_paths, failed_payment_events, prepare, where_to_look
    from service.demo import LiveOptions, port_taken, run_live

    live = serve_after or live_orders > 0
    if live and (taken := port_taken(host, port)):
        # Said before the simulation and the training (minutes on a fresh clone), not after them.
        raise fail(taken)
    try:
        paths = prepare(workdir, orders=orders, seed=seed, episodes=episodes, console=console)
    except ValueError as exc:  # a history too short to train on (TrainInputError included): one line, no traceback
        history = demo_paths(workdir).attempts.parent
        raise fail(
            f"{exc} (the demo trains on {history}: `make clean`, or another --workdir, and more --orders "
            "simulate a new one)"
        ) from None
    lines = where_to_look(paths, host, port)
    if not live:
        console.print(lines, highlight=False)
        return

    options = LiveOptions(
        workdir=paths.workdir,
        database_url=paths.database_url,
        tracking_uri=paths.tracking_uri,
        host=host,
        port=port,
        seed=seed,
        clock_speed=clock_speed,
        serve=serve_after,
        seconds=live_seconds,
        pay_share=pay_share,
    )
    run = uuid.uuid4().hex[:6]
    try:
        run_live(
            options,
            lambda now: failed_payment_events(seed, live_orders, orders, now, run),
            [sys.executable, "-m", "pipelines.cli"],
            console,
            where_to_look=lines.splitlines(),
        )
    except RuntimeError as exc:
        raise fail(str(exc)) from None


@app.command()
def bench(
    out: Annotated[Path, typer.Option("--out", help="Folder for histories, stores and bench.json.")] = Path(
        "bench-out"
    ),
    simulate_orders: Annotated[int, typer.Option("--simulate-orders", min=1000, help="Orders to simulate.")] = 100_000,
    train_attempts: Annotated[
        str,
        typer.Option(
            "--train-attempts",
            help="Comma-separated history sizes (attempts) to train on; the largest is simulated (~2 h for 10M "
            "on 2 cores, reused from --out), the others are its first orders.",
        ),
    ] = "100000,1000000,10000000",
    api_seconds: Annotated[float, typer.Option("--api-seconds", min=1, help="Seconds of load per API run.")] = 10.0,
    skip_api: Annotated[bool, typer.Option("--skip-api", help="Leave out the API benchmark.")] = False,
    skip_executor: Annotated[bool, typer.Option("--skip-executor", help="Leave out the executor benchmark.")] = False,
    executor_actions: Annotated[int, typer.Option("--executor-actions", min=100, help="Due actions per run.")] = 5_000,
) -> None:
    """Benchmarks on this machine, each printed beside a reference measured in the same run."""
    from service.signals import sigterm_exits

    # A SIGTERM ends the bench through its clean-ups, as Ctrl-C does: the job or servers it runs are stopped too.
    with sigterm_exits():
        _bench(out, simulate_orders, train_attempts, api_seconds, skip_api, skip_executor, executor_actions)


def _bench(
    out: Path,
    simulate_orders: int,
    train_attempts: str,
    api_seconds: float,
    skip_api: bool,
    skip_executor: bool,
    executor_actions: int,
) -> None:
    from pipelines.bench import (
        BenchRow,
        bench_table,
        machine,
        simulate_rows,
        train_rows,
        training_histories,
        write_bench_report,
    )

    try:
        sizes = sorted({int(part) for part in train_attempts.split(",") if part.strip()})
    except ValueError:
        raise fail(f"--train-attempts must be comma-separated integers, got {train_attempts!r}") from None
    out.mkdir(parents=True, exist_ok=True)
    rows: list[BenchRow] = []
    console.print(f"machine: {machine()}")
    sim_rows, _ = simulate_rows(out, simulate_orders)
    rows += sim_rows
    console.print(sim_rows[0])
    if sizes:
        trained = train_rows(out, training_histories(out, sizes))
        rows += trained
        for row in trained:
            console.print(row)
    extra: dict[str, object] = {}
    if not skip_api:
        from service.api.bench import TRAFFIC, run_bench

        store = out / f"mlruns-{sizes[-1] if len(sizes) < 2 else sizes[1]}-attempts" if sizes else None
        tracking_uri = f"sqlite:///{(store / 'mlflow.db').resolve()}" if store else None
        for traffic in TRAFFIC:
            api = run_bench(tracking_uri=tracking_uri, seconds=api_seconds, traffic=traffic, print_table=True)
            extra[f"api_{traffic}"] = api.as_dict()
            for name, figures in (("API closed loop", api.api), ("mlflow serve closed loop", api.mlflow)):
                rows.append(
                    BenchRow(
                        benchmark=f"{name}, {traffic} traffic",
                        inputs=f"{count_noun(api.distinct_requests, 'distinct request')}, "
                        f"{api.candidates_per_request} "
                        f"candidates/request, 2 workers, model {api.model_version}",
                        figure=f"{figures.rps:,.0f} req/s, p50 {figures.p50_ms} ms, p99 {figures.p99_ms} ms, "
                        f"server CPU {figures.cpu_ms_per_request} ms/request",
                        seconds=figures.seconds,
                        peak_rss_mb=max(api.worker_rss_mb)
                        if name.startswith("API") and api.worker_rss_mb
                        else float("nan"),
                        peak_rss_unmeasured="no API worker's memory could be read"
                        if name.startswith("API")
                        else "the bench reads the API's workers only (mlflow serve's whole process tree, as PSS, "
                        "is under the API table above)",
                        reference="mlflow models serve, same load generator, same run",
                        ratio=f"{api.ratio}x req/s, {api.cpu_ratio()}x CPU (7x judged on {api.judged_ratio()}x)"
                        if name.startswith("API")
                        else "1.0x",
                    )
                )
        if tracking_uri is not None:
            from dataclasses import asdict

            from service.api.swap_bench import (
                describe,
                latency_text,
                run_swap_bench,
                swap_during,
                swap_ratios,
            )

            swap = run_swap_bench(tracking_uri)
            console.print(f"decision API during model swaps: {describe(swap)}")
            extra["api_swap"] = asdict(swap)
            rows.append(
                BenchRow(
                    benchmark="decision API during model swaps, mixed traffic",
                    inputs=f"{swap.rate:g} req/s for 40 s, 2 workers, the champion moved {swap.moves} times "
                    f"(poll {swap.poll_seconds:g} s)",
                    figure=f"within 5 s of a move: {swap.near_errors} of {swap.near_requests} failed, p99 "
                    f"{latency_text(swap.near_p99_ms)}, slowest {latency_text(swap.near_max_ms)}; {swap_during(swap)}",
                    seconds=40.0,
                    peak_rss_mb=float("nan"),
                    peak_rss_unmeasured="the swap bench measures latency and errors, not memory",
                    reference=f"same run away from the moves: {swap.away_errors} of {swap.away_requests} failed, "
                    f"p90 {latency_text(swap.away_p90_ms)}, p99 {latency_text(swap.away_p99_ms)}, slowest "
                    f"{latency_text(swap.away_max_ms)}",
                    ratio=swap_ratios(swap),
                )
            )
            import math
            import time

            from service.api.swap_probe import describe_probe, phase_text, probe_ratio, run_swap_probe

            probe_started = time.perf_counter()
            probe = run_swap_probe(tracking_uri)
            probe_seconds = time.perf_counter() - probe_started
            ratio = probe_ratio(probe)
            console.print(f"a request beside a model swap, in one process: {describe_probe(probe)}")
            extra["api_swap_probe"] = asdict(probe)
            rows.append(
                BenchRow(
                    benchmark="decision API: a request in the worker loading a new model (in process)",
                    inputs=f"{probe.swaps} swaps; a thread standing in for the event loop sleeps 1-4 ms, then "
                    "decides a request of the mixed traffic, again and again",
                    figure=f"during the loads: {phase_text(probe.during)}",
                    seconds=round(probe_seconds, 1),
                    peak_rss_mb=float("nan"),
                    peak_rss_unmeasured="the probe runs in the bench's own process, whose peak is not the probe's",
                    reference=f"same run away from the loads: {phase_text(probe.away)}",
                    ratio=f"{ratio:.2f}x p90" if math.isfinite(ratio) else "-",
                )
            )
    if not skip_executor:
        from service.executor.bench import run_bench as run_executor_bench

        rates = run_executor_bench(count=executor_actions, console=console)
        extra["executor"] = rates
        reference = rates.get("sqlite, 1 worker", float("nan"))
        for name, rate in rates.items():
            rows.append(
                BenchRow(
                    benchmark=f"executor ({name})",
                    inputs=f"{executor_actions:,} due retries, counting connector, worker start-up included",
                    figure=f"{rate:,.0f} due actions/s",
                    seconds=float("nan"),
                    peak_rss_mb=float("nan"),
                    peak_rss_unmeasured="the executor bench measures due actions per second, not memory",
                    reference=f"SQLite, 1 worker, same run: {reference:,.0f}/s",
                    ratio=f"{rate / reference:.2f}x",
                )
            )
    console.print(bench_table(rows, f"winback bench — {machine()}"))
    report = out / "bench.json"
    write_bench_report(report, machine(), rows, extra)
    console.print(f"written {report}")


history_app = typer.Typer(cls=Group, help="History files for the feedback loop (CONTRACT.md section 3).")
app.add_typer(history_app, name="history")


@history_app.command("export")
def history_export(
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="Folder for attempts.parquet, nudges.parquet and stops.parquet (the stop decisions)."
        ),
    ],
    since: Annotated[
        str | None,
        typer.Option("--since", help="Only orders whose first attempt is at or after this ISO time (e.g. 2026-11-01)."),
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url", help="Database (default: $WINBACK_DATABASE_URL, else sqlite:///winback.db here)."
        ),
    ] = None,
    with_history: Annotated[
        Path | None,
        typer.Option(
            "--with-history",
            help="Also write every order of this earlier history folder (e.g. the one the champion was first "
            "trained on, or --out itself): the store holds only what was served since. An order the store holds "
            "too is taken from the store.",
        ),
    ] = None,
) -> None:
    """Write the executor's results, the outcomes reported to /v1/outcomes and the stop decisions as validated
    history files, with an earlier history's orders when --with-history names one.

    Exits 0 when the files are written, also empty (with a note) when the database holds no outcomes yet; 2 with a
    one-line reason when the database cannot be read or holds no winback tables.
    """
    from datetime import UTC, datetime

    from sqlalchemy.exc import ArgumentError, OperationalError

    from model.history import HistoryError
    from model.registry_client import shown_uri
    from pipelines.train import format_history_error, print_history_warnings
    from service.api.export import export_history

    output_folder(out, "--out")
    url = usable_database_url(database_url)
    start = None
    if since is not None:
        try:
            start = datetime.fromisoformat(since.replace("Z", "+00:00"))
        except ValueError:
            raise fail(f"--since must be an ISO date or time like 2026-11-01T00:00:00Z, got {since!r}") from None
        start = start if start.tzinfo is not None else start.replace(tzinfo=UTC)
    try:
        summary = export_history(url, out, since=start, with_history=with_history)
    except HistoryError as exc:
        if with_history is not None and str(with_history) in str(exc):
            raise fail(f"--with-history {with_history} breaks the contract: {format_history_error(exc)}") from None
        raise fail(f"the stored history breaks the contract: {format_history_error(exc)}") from None
    except FileNotFoundError as exc:
        raise fail(str(exc)) from None
    except (ArgumentError, OperationalError) as exc:
        raise fail(
            f"cannot read the database at --database-url {shown_uri(url)!r}: {str(exc).splitlines()[0]}"
        ) from None
    print_history_warnings(console, summary.earlier_warnings)
    print_history_warnings(console, summary.warnings)
    console.print(
        f"wrote {summary.attempts_path} ({count_noun(summary.attempts, 'attempt')}), {summary.nudges_path} "
        f"({count_noun(summary.nudges, 'nudge')}) and {summary.stops_path} ({count_noun(summary.stops, 'stop')}) "
        f"for {count_noun(summary.orders, 'order')}"
        + (
            f"; left out {count_noun(summary.dropped_after_success, 'attempt')} made after an order's success"
            if summary.dropped_after_success
            else ""
        ),
        highlight=False,
    )
    if with_history is not None:
        console.print(
            f"of which {count_noun(summary.earlier_orders, 'order')} from --with-history {with_history}"
            + (
                f"; {count_noun(summary.earlier_replaced, 'order')} it held too written as the store has them"
                if summary.earlier_replaced
                else ""
            ),
            highlight=False,
        )
    if summary.orders == summary.earlier_orders:
        when = "yet" if start is None else f"for orders started at or after {start.isoformat()}"
        console.print(
            f"note: no outcomes in {shown_uri(url)} {when}: "
            + (
                "the three files are empty (valid, with the history files' columns). "
                if with_history is None
                else f"the files hold the orders of --with-history {with_history} only. "
            )
            + "Outcomes come from the executor (`winback executor run`, carrying out the orders "
            "posted to POST /v1/events/payment-failed) and from callers reporting what came of a decision to "
            "POST /v1/outcomes.",
            highlight=False,
        )
    if summary.renamed_orders:
        console.print(
            f"{count_noun(len(summary.renamed_orders), 'order')} with an order_id another merchant uses too, "
            "written as merchant_id/order_id: " + "; ".join(summary.renamed_orders[:10]),
            highlight=False,
        )
    if summary.left_out_orders:
        shown = summary.left_out_orders[:10]
        more = len(summary.left_out_orders) - len(shown)
        console.print(
            f"left out {count_noun(len(summary.left_out_orders), 'order')} whose history the history files "
            "cannot carry: " + "; ".join(shown) + (f"; and {more} more" if more else ""),
            highlight=False,
        )


codes_app = typer.Typer(cls=Group, help="Error codes: which ones the model has not learned yet, and cold-start priors.")
app.add_typer(codes_app, name="codes")


@codes_app.command("report")
def codes_report(
    attempts: Annotated[Path, typer.Option("--attempts", help="Attempts history (.parquet or .csv).")],
    nudges: Annotated[Path, typer.Option("--nudges", help="Nudges history (.parquet or .csv).")],
    tracking_uri: TrackingUriOption = None,
    alias: Annotated[str, typer.Option("--alias", help="Registry alias of the model to compare with.")] = "champion",
    min_support: Annotated[
        int, typer.Option("--min-support", "-k", min=1, help="List codes the model trained on fewer times than this.")
    ] = 30,
    config: ConfigOption = None,
    gsm: Annotated[
        Path | None, typer.Option("--gsm", help="Overlay from `winback codes import-gsm`, to show its verdict.")
    ] = None,
    csv_out: Annotated[
        Path | None, typer.Option("--csv", help="Also write the report, every code of it, as CSV here.")
    ] = None,
    limit: Annotated[
        int,
        typer.Option(
            "--limit",
            min=1,
            help="Show this many codes, those with the most failures (--csv writes every code).",
        ),
    ] = 20,
    show_all: Annotated[bool, typer.Option("--all", help="Show every code, whatever --limit says.")] = False,
) -> None:
    """List error codes of a history the model's training never saw (or saw fewer than k times).

    Per code: failures, retries and their outcomes so far, the model's retryability estimate for a typical
    failure with it, and the nearest known codes by message. The codes with the most failures first; --csv
    writes every code.
    """
    from model.gsm import GsmError
    from model.registry import RegistryError
    from pipelines.codes import codes_report as build_report
    from pipelines.codes import report_view
    from pipelines.train import TrainInputError, print_history_warnings

    readable_inputs(("--attempts", attempts), ("--nudges", nudges), ("--config", config), ("--gsm", gsm))
    if csv_out is not None:
        output_file(csv_out, "--csv")
    known_alias(alias, tracking_uri)
    try:
        report, version, failed_attempts, catalog_lines, warnings = build_report(
            attempts,
            nudges,
            tracking_uri=tracking_uri,
            alias=alias,
            min_support=min_support,
            config=config,
            overlay=gsm,
        )
    except (TrainInputError, GsmError, FileNotFoundError, RegistryError) as exc:
        raise fail(str(exc)) from None
    print_history_warnings(console, warnings)
    for line in catalog_lines:
        console.print(line, highlight=False, soft_wrap=True, markup=False)
    if csv_out is not None:
        report.to_csv(csv_out, index=False)
    if not failed_attempts:
        console.print(f"the history in {attempts} holds no failed attempt: there is no error code to report")
    elif report.empty:
        console.print(
            f"every error code of the history was seen at least {count_noun(min_support, 'time')} by model {version}"
        )
    else:
        console.print(report_view(report, version, min_support, limit=None if show_all else limit, csv_out=csv_out))
    if csv_out is not None:
        console.print(f"written {csv_out}")


@codes_app.command("import-gsm")
def codes_import_gsm(
    file: Annotated[Path, typer.Argument(help="CSV export of Hyperswitch's gateway_status_map table.")],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Overlay file (default: data/generated/gsm_overlay.csv, installed: ./generated/)."),
    ] = None,
) -> None:
    """Import a gateway status map as priors and rules for codes no history has shown yet.

    Serve with WINBACK_GSM_OVERLAY=<overlay> so the scorer classifies those codes as the switch did.
    """
    from model.gsm import DEFAULT_OVERLAY, GsmError
    from pipelines.codes import import_gsm

    output_file(out or DEFAULT_OVERLAY, "--out")
    try:
        target = import_gsm(file, out or DEFAULT_OVERLAY, console=console)
    except GsmError as exc:
        raise fail(str(exc)) from None
    console.print(f"written {target}; serve with WINBACK_GSM_OVERLAY={target}", highlight=False, soft_wrap=True)


@app.command()
def retrain(
    attempts: Annotated[Path, typer.Option("--attempts", help="Updated attempts history (.parquet or .csv).")],
    nudges: Annotated[Path, typer.Option("--nudges", help="Updated nudges history (.parquet or .csv).")],
    window_days: Annotated[
        float | None,
        typer.Option("--window-days", min=0.001, help="Train on orders of the last D days only (default: all)."),
    ] = None,
    tracking_uri: TrackingUriOption = None,
    every: Annotated[
        str | None, typer.Option("--every", help="Repeat on this period (e.g. 24h, 30m) until stopped.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed of training and evaluation.")] = 0,
    config: ConfigOption = None,
    episodes: Annotated[
        int | None,
        typer.Option("--episodes", min=0, help="Simulator orders per policy in the evaluation (default: 2000)."),
    ] = None,
    gate: Annotated[
        str | None,
        typer.Option(
            "--gate", help="Gate metrics to check, comma-separated without spaces (default: all), e.g. retry_auc."
        ),
    ] = None,
    refit: RefitOption = True,
    stops: StopsOption = None,
    policy_value_margin: PolicyValueMarginOption = 0.05,
) -> None:
    """Train a challenger on the updated history, gate it against the champion, promote or keep (with why).

    Running scorers follow the champion alias and switch by themselves. With --every the job repeats; a
    cron line calling `winback retrain` does the same (see the README).
    """
    from pipelines.gate import with_policy_value_margin
    from pipelines.retrain import RetrainResult, gate_checks, parse_every, retrain_loop
    from pipelines.retrain import retrain as run_retrain
    from pipelines.train import TrainInputError, resolve_stops

    readable_inputs(("--attempts", attempts), ("--nudges", nudges), ("--stops", stops), ("--config", config))
    gate_names = None if gate is None else [part.strip() for part in gate.split(",") if part.strip()]
    try:  # refused at start, not once per period of --every
        with_policy_value_margin(gate_checks(gate_names), policy_value_margin)
    except ValueError as exc:
        raise fail(str(exc)) from None

    def once() -> RetrainResult:
        stops_file = resolve_stops(attempts, stops)  # looked for again each time: an export may have written one
        if stops is None and stops_file is not None:
            console.print(f"logged stops: {stops_file} (beside --attempts)", highlight=False, soft_wrap=True)
        result = run_retrain(
            attempts,
            nudges,
            stops=stops_file,
            tracking_uri=tracking_uri,
            window_days=window_days,
            seed=seed,
            config=config,
            evaluation_options=None if episodes is None else {"episode_orders": episodes},
            console=console,
            gate=gate_names,
            refit=refit,
            policy_value_margin=policy_value_margin,
        )
        # The training run has printed the gate's table with its verdict as the caption: saying it again read as
        # a second verdict.
        return result

    if every is None:
        try:
            once()
        except (TrainInputError, ValueError) as exc:
            raise fail(str(exc)) from None
        return
    try:
        period = parse_every(every)
    except ValueError as exc:
        raise fail(str(exc)) from None
    retrain_loop(
        once,
        period,
        on_error=lambda exc: err_console.print(f"[bold red]retrain failed:[/] {exc}", highlight=False, soft_wrap=True),
    )


console_app = typer.Typer(cls=Group, help="The agent console: who may sign in to work a merchant's queue.")
app.add_typer(console_app, name="console")


@console_app.command("add-agent")
def console_add_agent(
    merchant: Annotated[str, typer.Option("--merchant", help="The merchant whose orders the agent works.")],
    name: Annotated[str, typer.Option("--name", help="Sign-in name, unique across merchants (e.g. asha@shop).")],
    config: ConfigOption = None,
    database_url: Annotated[
        str | None,
        typer.Option("--database-url", help="Database (default: $WINBACK_DATABASE_URL, else sqlite:///winback.db)."),
    ] = None,
) -> None:
    """Create a console agent; the password comes from $WINBACK_AGENT_PASSWORD or a hidden prompt."""
    import os

    from model.merchant_config import ConfigError
    from service.console.admin import PASSWORD_ENV, create_agent
    from service.console.auth import AgentError
    from service.migrations import UnusableDatabaseError

    url = usable_database_url(database_url)  # before the password prompt: a typo is not found after typing it twice
    password = os.environ.get(PASSWORD_ENV) or typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        agent = create_agent(url, merchant, name, password, config)
    except (AgentError, ConfigError, UnusableDatabaseError) as exc:  # a SQLite folder that cannot be created
        raise fail(str(exc)) from None
    console.print(
        f"agent {agent.name} can now sign in to the console for merchant {agent.merchant_id}", highlight=False
    )


if __name__ == "__main__":  # pragma: no cover - manual entry point
    app()

"""The `winback` command line: the one composition root of the project (CONTRACT.md section 1)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
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


def fail(message: str) -> typer.Exit:
    """Print a one-line reason on stderr and return the exit to raise (code 2)."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


@app.command()
def simulate(
    out: Annotated[Path, typer.Option("--out", help="Folder for attempts.parquet and nudges.parquet.")],
    orders: Annotated[int, typer.Option("--orders", min=1, help="Failed orders to simulate.")] = 20_000,
    seed: Annotated[int, typer.Option("--seed", help="Random seed; the same seed gives the same files.")] = 1,
) -> None:
    """Write a realistic synthetic history of failed payments (CONTRACT.md section 3)."""
    from pipelines.simulate import simulate as run_simulation

    summary = run_simulation(out, orders=orders, seed=seed, progress=True)
    console.print(summary)


@app.command()
def train(
    attempts: Annotated[Path, typer.Option("--attempts", help="Attempts history (.parquet or .csv).")],
    nudges: Annotated[Path, typer.Option("--nudges", help="Nudges history (.parquet or .csv).")],
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            "--tracking-uri",
            help="MLflow tracking URI [default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db here].",
        ),
    ] = None,
    promote: Annotated[
        bool, typer.Option("--promote", help="Move alias champion to the new version if it passes the gate.")
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Random seed of training and evaluation.")] = 0,
    config: Annotated[
        Path | None, typer.Option("--config", help="Merchant config for replaying policies [default: demo config].")
    ] = None,
) -> None:
    """Validate the history, train, evaluate, log to MLflow and register `winback` (alias challenger)."""
    from pipelines.train import train_command

    code = train_command(
        attempts, nudges, tracking_uri, promote, seed=seed, config=config, console=console, err_console=err_console
    )
    if code:
        raise typer.Exit(code=code)


if __name__ == "__main__":  # pragma: no cover - manual entry point
    app()

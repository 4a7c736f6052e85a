"""`winback demo`: everything a newcomer needs to see winback work, on embedded defaults only.

Simulates a history (once), trains on it and registers + promotes the model in a local MLflow store inside the
work folder; the CLI then starts the services. Nothing leaves the machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from model.registry import get_alias_version
from pipelines.simulate import simulate
from pipelines.train import run_training

DEMO_MERCHANT = "m_us_saas"


@dataclass(frozen=True)
class DemoPaths:
    workdir: Path
    attempts: Path
    nudges: Path
    tracking_uri: str
    database_url: str


def demo_paths(workdir: Path) -> DemoPaths:
    root = workdir.resolve()
    return DemoPaths(
        workdir=root,
        attempts=root / "history" / "attempts.parquet",
        nudges=root / "history" / "nudges.parquet",
        tracking_uri=f"sqlite:///{root / 'mlruns' / 'mlflow.db'}",
        database_url=f"sqlite:///{root / 'winback.db'}",
    )


def prepare(workdir: Path, *, orders: int, seed: int, episodes: int, console: Console) -> DemoPaths:
    """Simulate (unless a history is already there), then train, register and promote a model."""
    paths = demo_paths(workdir)
    paths.workdir.mkdir(parents=True, exist_ok=True)
    if paths.attempts.is_file() and paths.nudges.is_file():
        console.print(f"using the history already in {paths.attempts.parent}")
    else:
        summary = simulate(paths.attempts.parent, orders=orders, seed=seed, progress=True)
        console.print(
            f"simulated {summary.orders} failed orders ({summary.attempts} attempts, {summary.nudges} nudges); "
            f"the logging policy recovered {summary.recovery_rate:.1%}"
        )
    if get_alias_version("champion", tracking_uri=paths.tracking_uri) is None:
        run_training(
            paths.attempts,
            paths.nudges,
            tracking_uri=paths.tracking_uri,
            promote=True,
            seed=seed,
            evaluation_options={"episode_orders": episodes},
            console=console,
        )
    else:
        console.print(f"a champion is already registered in {paths.tracking_uri}")
    return paths


def where_to_look(paths: DemoPaths, host: str, port: int) -> str:
    """The lines printed before the services start."""
    base = f"http://{host}:{port}"
    return "\n".join(
        [
            f"winback demo on {base}",
            f"  API docs        {base}/docs",
            f"  readiness       {base}/readyz   metrics {base}/metrics",
            f"  MLflow store    {paths.tracking_uri}  (mlflow ui --backend-store-uri {paths.tracking_uri})",
            f"  evaluation      {paths.workdir / 'mlruns'} (artifacts of the training run: evaluation/evaluation.md)",
            "  try a decision:",
            f"    curl -s {base}/v1/decisions -H 'Authorization: Bearer wb_demo_{DEMO_MERCHANT}' \\",
            "      -H 'content-type: application/json' -d @data/demo/request.json",
        ]
    )

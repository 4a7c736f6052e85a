"""`winback demo`: everything a newcomer needs to see winback work, on embedded defaults only.

Simulates a history (once), trains on it and registers + promotes the model in a local MLflow store inside the
work folder, and makes the failed payments the live loop posts (simulated first failures of the demo merchants);
the CLI then starts the services and the loop (``service.demo``). Nothing leaves the machine.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from model.datafiles import DEMO_REQUEST_FILE
from model.registry import get_alias_version
from model.registry_client import run_artifact_dir
from model.wording import count_noun, labelled_lines
from pipelines.simulate import simulate
from pipelines.train import resolve_stops, run_training

DEMO_MERCHANT = "m_us_saas"
#: Country calling codes of the simulated customers' countries (for their made-up phone numbers).
CALLING_CODES = {"IN": "91", "US": "1", "GB": "44", "DE": "49"}


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
        console.print(
            f"using the history already in {paths.attempts.parent}, not simulated again (--orders and --seed "
            f"apply to a new one: `make clean`, or another --workdir)",
            highlight=False,
        )
    else:
        summary = simulate(paths.attempts.parent, orders=orders, seed=seed, progress=True, console=console)
        console.print(
            f"simulated {count_noun(summary.orders, 'failed order')} ({count_noun(summary.attempts, 'attempt')}, "
            f"{count_noun(summary.nudges, 'nudge')}); "
            f"the logging policy recovered {summary.recovery_rate:.1%}"
        )
    champion = get_alias_version("champion", tracking_uri=paths.tracking_uri)
    if champion is None:
        run_training(
            paths.attempts,
            paths.nudges,
            stops=resolve_stops(paths.attempts, None),  # simulate writes it; a demo history kept from before has none
            tracking_uri=paths.tracking_uri,
            promote=True,
            seed=seed,
            evaluation_options={"episode_orders": episodes},
            console=console,
        )
    else:
        console.print(
            f"using version {champion}, the champion already registered in {paths.tracking_uri}, not trained again",
            highlight=False,
        )
    return paths


def evaluation_report(paths: DemoPaths) -> str:
    """The champion's evaluation report (the file its training run logged), else the store's folder."""
    version = get_alias_version("champion", tracking_uri=paths.tracking_uri)
    folder = None if version is None else run_artifact_dir(version, tracking_uri=paths.tracking_uri)
    report = None if folder is None else folder / "evaluation" / "evaluation.md"
    if report is not None and report.is_file():
        return str(report)
    return f"{paths.workdir / 'mlruns'} (artifacts of the training run: evaluation/evaluation.md)"


def mlflow_command() -> str:
    """How to call MLflow's command line from the working folder: the ``mlflow`` script installed beside this
    Python (``.venv/bin/mlflow`` after ``make demo``; a bare ``mlflow`` is found only with ``.venv/bin`` on the
    PATH), relative to the working folder when under it; ``python -m mlflow`` when there is no such script."""
    script = Path(sys.executable).parent / "mlflow"
    if not script.is_file():
        return f"{sys.executable} -m mlflow"
    try:
        relative = script.relative_to(Path.cwd())
    except ValueError:
        return str(script)
    return str(relative) if len(relative.parts) > 1 else f"./{relative}"


def where_to_look(paths: DemoPaths, host: str, port: int) -> str:
    """The lines printed before the services start."""
    base = f"http://{host}:{port}"
    entries = [
        ("API docs", f"{base}/docs"),
        ("readiness", f"{base}/readyz"),
        ("metrics", f"{base}/metrics"),
        ("MLflow store", paths.tracking_uri),
        ("evaluation", evaluation_report(paths)),
    ]
    return "\n".join(
        [
            f"winback demo on {base}",
            *(line for label, value in entries for line in labelled_lines(label, value)),
            "  browse the MLflow store:",
            f"    {mlflow_command()} ui --backend-store-uri \\",
            f"      {paths.tracking_uri}",
            "  try a decision:",
            f"    curl -s {base}/v1/decisions \\",
            f"      -H 'Authorization: Bearer wb_demo_{DEMO_MERCHANT}' \\",
            "      -H 'content-type: application/json' \\",
            f"      -d @{DEMO_REQUEST_FILE}",
        ]
    )


def customer_addresses(customer: dict[str, Any]) -> dict[str, str]:
    """Made-up addresses for the channels a simulated customer has (the executor sends to these)."""
    digest = int(hashlib.sha256(str(customer["id"]).encode()).hexdigest(), 16)
    found: dict[str, str] = {}
    if customer.get("phone_present"):
        code = CALLING_CODES.get(str(customer.get("country")), "91")
        found["phone"] = f"+{code}{7_000_000_000 + digest % 2_999_999_999}"
    if customer.get("email_present"):
        found["email"] = f"{customer['id']}@customers.example"
    if customer.get("app_present"):
        found["device_token"] = f"dev_{digest % 10**12:012d}"
    return found


def failed_payment_events(seed: int, count: int, first_index: int, now: datetime, run: str) -> list[dict[str, Any]]:
    """``count`` failed-payment events (CONTRACT.md section 5) happening ``now``: the simulator's first failures
    of orders ``first_index``, ``first_index + 1``, ... (after the ones in the trained history), with the
    customers' made-up addresses; order ids carry ``run`` so every run's orders are new."""
    from model.simulation.episodes import first_failure_request
    from model.simulation.world import World

    world = World(seed)
    stamp = now.isoformat().replace("+00:00", "Z")
    events: list[dict[str, Any]] = []
    for number in range(count):
        order = world.order(first_index + number)
        body = first_failure_request(world, order).model_dump(mode="json")
        order_id = f"live_{run}_{number:03d}"
        body["order_id"] = order_id
        body["event_time"] = stamp
        for attempt in body["history"]["attempts"]:
            attempt["created_at"] = stamp
        body["customer"] |= customer_addresses(body["customer"])
        body["idempotency_key"] = f"{order_id}:payment-failed"
        events.append(body)
    return events

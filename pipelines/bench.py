"""`winback bench`: the simulator and training benchmarks, each beside a reference measured in the same run.

Every figure comes from a fresh child process (``python -m pipelines.bench JOB ...``) that reports its own wall
time and peak RSS (itself and its worker processes), so one job's memory never hides another's. The API and
executor benchmarks live with their processes in ``service/`` and are composed by ``pipelines/cli.py``.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SIMULATE_BUDGET_SECONDS_PER_100K = 120.0  # issue: 100,000 orders simulate in under 2 minutes
TRAIN_BUDGET_SECONDS_PER_100K = 180.0  # issue: 100,000 orders train end to end in under 3 minutes


@dataclass(frozen=True)
class BenchRow:
    """One line of the bench table."""

    benchmark: str
    inputs: str
    figure: str
    seconds: float
    peak_rss_mb: float
    reference: str
    ratio: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def machine() -> str:
    """The machine a figure was measured on (cores, memory, CPU model, Python)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores, {memory_gib:.0f} GiB, {cpu}, Python {platform.python_version()}"


def _peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024.0  # Linux reports KiB


def run_child(job: str, *args: str) -> dict[str, Any]:
    """Run one benchmark job in a fresh interpreter and return what it measured."""
    completed = subprocess.run(
        [sys.executable, "-m", "pipelines.bench", job, *args],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    return dict(json.loads(completed.stdout.strip().splitlines()[-1]))


def _job_simulate(out: str, orders: str, seed: str) -> dict[str, Any]:
    from pipelines.simulate import simulate

    started = time.perf_counter()
    summary = simulate(Path(out), orders=int(orders), seed=int(seed), progress=False)
    return {"seconds": time.perf_counter() - started, "attempts": summary.attempts, "nudges": summary.nudges}


def _job_world_floor(orders: str, seed: str) -> dict[str, Any]:
    """Reference: the same world's orders played by a policy that stops at once (world cost, no decisions)."""
    from model.requests import Decision
    from model.simulation.episodes import run_episodes
    from model.simulation.world import World
    from model.vocab import Action

    def stop(request: Any) -> Decision:
        return Decision(
            decision_id="dec_bench",
            model_version="stop",
            action=Action.STOP,
            execute_at=request.event_time,
            retryable=False,
            retry_probability=0.0,
            expected_success=0.0,
            propensity=1.0,
        )

    world = World(int(seed), expected_orders=int(orders))
    started = time.perf_counter()
    run_episodes(world, stop, int(orders), int(seed))
    return {"seconds": time.perf_counter() - started}


def _job_validate(attempts: str, nudges: str) -> dict[str, Any]:
    from model.history import read_history

    started = time.perf_counter()
    history = read_history(attempts, nudges)
    return {"seconds": time.perf_counter() - started, "attempt_rows": len(history.attempts)}


def _job_train(attempts: str, nudges: str, tracking_uri: str, episodes: str) -> dict[str, Any]:
    from rich.console import Console

    from pipelines.train import run_training

    started = time.perf_counter()
    summary = run_training(
        attempts,
        nudges,
        tracking_uri=tracking_uri,
        promote=True,
        evaluation_options={"episode_orders": int(episodes)},
        console=Console(file=open(os.devnull, "w")),  # noqa: SIM115 - closed with the process
        show_progress=False,
    )
    return {"seconds": time.perf_counter() - started, "version": summary.version}


_JOBS: dict[str, Callable[..., dict[str, Any]]] = {
    "simulate": _job_simulate,
    "world-floor": _job_world_floor,
    "validate": _job_validate,
    "train": _job_train,
}


def simulate_rows(out: Path, orders: int, seed: int = 1) -> tuple[list[BenchRow], Path]:
    """Simulate ``orders`` (2 worker processes) beside the world-only floor on the same orders."""
    folder = out / f"history-{orders}"
    sim = run_child("simulate", str(folder), str(orders), str(seed))
    return _simulate_row(sim, orders, seed), folder


def history_for(out: Path, orders: int, seed: int = 1) -> Path:
    """A simulated history of ``orders`` for the training benchmark (reused when already there)."""
    folder = out / f"history-{orders}"
    if not ((folder / "attempts.parquet").is_file() and (folder / "nudges.parquet").is_file()):
        run_child("simulate", str(folder), str(orders), str(seed))
    return folder


def _simulate_row(sim: dict[str, Any], orders: int, seed: int) -> list[BenchRow]:
    floor = run_child("world-floor", str(min(orders, 20_000)), str(seed))
    floor_rate = min(orders, 20_000) / floor["seconds"]
    rate = orders / sim["seconds"]
    budget = SIMULATE_BUDGET_SECONDS_PER_100K * orders / 100_000
    rows = [
        BenchRow(
            benchmark="simulate",
            inputs=f"{orders:,} failed orders, seed {seed}, 2 processes ({sim['attempts']:,} attempts)",
            figure=f"{rate:,.0f} orders/s",
            seconds=round(sim["seconds"], 1),
            peak_rss_mb=round(sim["peak_rss_mb"], 0),
            reference=f"world only, always-stop policy, 1 process: {floor_rate:,.0f} orders/s; budget {budget:.0f} s",
            ratio=f"{rate / floor_rate:.2f}x of world-only"
            + (f"; {budget / sim['seconds']:.1f}x inside budget" if orders >= 100_000 else ""),
        )
    ]
    return rows


def train_rows(out: Path, history: Path, orders: int, episodes: int = 500) -> list[BenchRow]:
    """Train end to end (validate -> train -> evaluate -> register -> promote) beside validation alone."""
    attempts, nudges = history / "attempts.parquet", history / "nudges.parquet"
    store = out / f"mlruns-{orders}"
    tracking_uri = f"sqlite:///{(store / 'mlflow.db').resolve()}"
    train = run_child("train", str(attempts), str(nudges), tracking_uri, str(episodes))
    validate = run_child("validate", str(attempts), str(nudges))
    budget = TRAIN_BUDGET_SECONDS_PER_100K * orders / 100_000
    return [
        BenchRow(
            benchmark="train",
            inputs=f"{orders:,} orders ({validate['attempt_rows']:,} attempts), episodes {episodes}/policy",
            figure=f"{train['seconds']:.0f} s end to end",
            seconds=round(train["seconds"], 1),
            peak_rss_mb=round(train["peak_rss_mb"], 0),
            reference=f"read + validate alone: {validate['seconds']:.1f} s, {validate['peak_rss_mb']:.0f} MB",
            ratio=f"{train['seconds'] / validate['seconds']:.1f}x of validation"
            + (f"; {budget / train['seconds']:.1f}x inside the {budget:.0f} s budget" if orders >= 100_000 else ""),
        )
    ]


def main(argv: list[str]) -> None:
    """Child entry point: run one job, print its figures as one JSON line."""
    job, *args = argv
    result = _JOBS[job](*args)
    result["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])

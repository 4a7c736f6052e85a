"""`winback bench`: the simulator and training benchmarks, each beside a reference measured in the same run.

Every figure comes from a fresh child process (``python -m pipelines.bench JOB ...``) that reports its own wall
time and peak RSS (itself and its worker processes), so one job's memory never hides another's. The API and
executor benchmarks live with their processes in ``service/`` and are composed by ``pipelines/cli.py``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from model.wording import MISSING, figure

SIMULATE_BUDGET_SECONDS_PER_100K = 120.0  # issue: 100,000 orders simulate in under 2 minutes


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
    #: Why ``peak_rss_mb`` is NaN, said under the table: the benchmark measures no peak memory of its own.
    peak_rss_unmeasured: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def without_nan(value: Any) -> Any:
    """``value`` (nested dicts, lists and tuples) with every NaN or infinite number as None: ``json.dumps`` writes
    those as bare ``NaN``/``Infinity``, which JSON does not have and strict readers (jq, ``JSON.parse``) refuse."""
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: without_nan(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [without_nan(item) for item in value]
    return value


def write_bench_report(path: Path, machine: str, rows: Sequence[BenchRow], extra: dict[str, object]) -> None:
    """``bench.json``: the machine, the table's rows and each benchmark's own figures, as strict JSON (a figure a
    benchmark does not measure, NaN in the table's rows, is null)."""
    document = {"machine": machine, "rows": [row.as_dict() for row in rows], **extra}
    path.write_text(json.dumps(without_nan(document), indent=1, default=str, allow_nan=False), encoding="utf-8")


def bench_table(rows: Sequence[BenchRow], title: str) -> Table:
    """The bench's rows as one table; a peak RSS a benchmark does not measure is "-", and the caption says why."""
    unmeasured: dict[str, list[str]] = {}
    for row in rows:
        if figure(row.peak_rss_mb) == MISSING:
            reason = row.peak_rss_unmeasured or "not measured"
            unmeasured.setdefault(reason, []).append(row.benchmark)
    caption = "; ".join(f"peak RSS - for {', '.join(names)}: {reason}" for reason, names in unmeasured.items())
    table = Table(title=title, caption=caption or None, caption_justify="left")
    for column in ("benchmark", "inputs", "figure", "peak RSS MB", "reference (same run)", "ratio"):
        table.add_column(column)
    for row in rows:
        table.add_row(row.benchmark, row.inputs, row.figure, figure(row.peak_rss_mb, ".0f"), row.reference, row.ratio)
    return table


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


#: How long a job has to end once the bench is stopped (Ctrl-C, SIGTERM) before it is killed.
JOB_STOP_SECONDS = 10.0


def run_child(job: str, *args: str) -> dict[str, Any]:
    """Run one benchmark job in a fresh interpreter and return what it measured.

    ``peak_rss_mb`` is the peak of the job's whole process tree sampled every half second (proportional set
    size: pages the forked workers share with their parent count once), so worker processes that run side by
    side are counted together; the job's own ``ru_maxrss`` only when nothing could be sampled.
    """
    command = [sys.executable, "-m", "pipelines.bench", job, *args]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    job_run = run_job(command, env)
    if job_run.returncode:
        raise subprocess.CalledProcessError(job_run.returncode, command, job_run.stdout, job_run.stderr)
    result = dict(json.loads(job_run.stdout.strip().splitlines()[-1]))
    # Linux carries a parent's peak RSS into a child it forks (ru_maxrss survives exec), so the job's own
    # figure can be the bench process's; the sampled tree is the job's.
    if job_run.peak_pss_bytes > 0:
        result["peak_rss_mb"] = job_run.peak_pss_bytes / 2**20
    return result


@dataclass(frozen=True)
class JobRun:
    """What a job printed, how it ended, and the peak PSS of its process tree (0 if never sampled)."""

    stdout: str
    stderr: str
    returncode: int
    peak_pss_bytes: float


def run_job(command: list[str], env: dict[str, str], stop_seconds: float = JOB_STOP_SECONDS) -> JobRun:
    """Run ``command`` to its end, sampling its process tree's memory.

    The job runs in a process group of its own, with the worker processes it forks (a training or simulation
    job's pool). If the bench is stopped meanwhile (Ctrl-C; a SIGTERM, which ``winback bench`` raises as
    SystemExit), the job is stopped too before the stop goes on (``_stop_job``). Before, a SIGTERM to the bench's
    pid ended it at once and left a training job running for up to two hours, and a Ctrl-C to it alone left the job
    running as well (``Popen``'s exit waits 0.25 s for its child on a KeyboardInterrupt)."""
    child = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, process_group=0
    )
    done = threading.Event()
    tree_peak = [0.0]
    try:
        sampler = threading.Thread(target=_sample_tree, args=(child.pid, done, tree_peak), daemon=True)
        sampler.start()
        try:
            stdout, stderr = child.communicate()
        finally:
            done.set()
            sampler.join()
    except BaseException:
        _stop_job(child, stop_seconds)
        raise
    return JobRun(stdout, stderr, child.returncode, tree_peak[0])


def _stop_job(child: subprocess.Popen[str], stop_seconds: float) -> None:
    """Stop a job and its process group: SIGINT first, so the job ends as on a Ctrl-C (its pool shut down, its
    temporary files removed); SIGKILL to the whole group ``stop_seconds`` later, or at once on a second Ctrl-C or
    SIGTERM meanwhile (which then goes on); the job reaped either way. Its output is read meanwhile, so a job
    writing much on its way out does not block on a full pipe."""
    try:
        _signal_group(child.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.communicate(timeout=stop_seconds)
    finally:
        _signal_group(child.pid, signal.SIGKILL)  # what is left of the group: the job, or workers it left behind
        child.wait()
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()


def _signal_group(group: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signum)


def _sample_tree(pid: int, done: threading.Event, peak: list[float]) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.Error:
        return
    while not done.wait(0.5):
        total = 0.0
        try:
            members = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for member in members:
            try:
                total += member.memory_full_info().pss
            except psutil.Error:
                continue
        peak[0] = max(peak[0], total)


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


def _job_train(attempts: str, nudges: str, tracking_uri: str, episodes: str, threads: str = "1") -> dict[str, Any]:
    from rich.console import Console

    from pipelines.train import run_training

    started = time.perf_counter()
    summary = run_training(
        attempts,
        nudges,
        tracking_uri=tracking_uri,
        promote=True,
        train_options={"num_threads": int(threads), "workers": int(threads)},
        evaluation_options={"episode_orders": int(episodes)},
        console=Console(quiet=True),
        show_progress=False,
    )
    return {
        "seconds": time.perf_counter() - started,
        "version": summary.version,
        "partitions": summary.metrics.get("n_partitions", 1.0),
        "decision_points": summary.metrics.get("n_points", float("nan")),
    }


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


#: Attempts per simulated order, to size a simulation, taken a little low so a simulation is never short (seed 1:
#: 8,824 attempts for 5,000 orders, 1.76; its first 556 orders 985, 1.77). It was 1.939 before step-ups and SCA
#: soft declines were limited to a cardholder in session, 1.91 before mandates were no longer cascaded and
#: block lists' refusals no longer retried, and 1.80 (1.85 measured) before an Indian card's renewal, which runs on
#: an RBI e-mandate, was no longer cascaded, and 1.72 before timeouts were held for their late outcome and Indian
#: one-off card payments left only a step-up (582 orders then gave 988 attempts, 1.70; fewer retries each time).
_ATTEMPTS_PER_ORDER = 1.65


def training_histories(out: Path, attempts: list[int], seed: int = 1) -> dict[int, tuple[Path, int, int]]:
    """Histories of about each number of ``attempts``: one simulation for the largest, the others its first orders.

    Returns ``size -> (folder, attempts, orders)``. The simulation is reused when ``out`` already holds it.
    Smaller histories are the first orders of the same world (whole orders, so still valid histories), which
    keeps the sizes comparable: the same merchants, period and mix, only fewer orders.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    largest = max(attempts)
    orders = int(largest / _ATTEMPTS_PER_ORDER) + 1
    source = history_for(out, orders, seed)
    order_ids = pq.read_table(source / "attempts.parquet", columns=["order_id"]).column("order_id")
    counts = pc.value_counts(order_ids).flatten()  # in order of first appearance: the file is in order order
    values, per_order = counts[0].to_pylist(), counts[1].to_numpy().cumsum()
    result: dict[int, tuple[Path, int, int]] = {}
    for size in sorted(attempts):
        n_orders = min(int((per_order < size).sum()) + 1, len(values))
        if n_orders >= 0.995 * len(values):  # (nearly) all of it: no copy
            result[size] = (source, int(per_order[-1]), n_orders)
            continue
        folder = out / f"history-{size}-attempts"
        if not (folder / "attempts.parquet").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            keep = pyarrow_set(values[:n_orders])
            for name in ("attempts", "nudges"):
                table = pq.read_table(source / f"{name}.parquet")
                pq.write_table(
                    table.filter(pc.is_in(table.column("order_id"), value_set=keep)), folder / f"{name}.parquet"
                )
        result[size] = (folder, int(per_order[n_orders - 1]), n_orders)
    return result


def pyarrow_set(values: list[str]) -> Any:
    import pyarrow

    return pyarrow.array(values, type=pyarrow.string())


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


def train_rows(
    out: Path, histories: dict[int, tuple[Path, int, int]], episodes: int = 500, threads: int = 2
) -> list[BenchRow]:
    """Train end to end (validate -> train -> evaluate -> register -> promote) at each history size.

    Each row's reference is the previous (smaller) size of the same run, so the ratio shows how cost grows with
    data; the smallest is beside reading + validating its history alone. The largest runs first, so a run cut
    short still has the figure that takes longest to get.
    """
    measured: dict[int, dict[str, Any]] = {}
    for size in sorted(histories, reverse=True):
        folder = histories[size][0]
        store = out / f"mlruns-{size}-attempts"
        tracking_uri = f"sqlite:///{(store / 'mlflow.db').resolve()}"
        args = (str(folder / "attempts.parquet"), str(folder / "nudges.parquet"))
        measured[size] = run_child("train", *args, tracking_uri, str(episodes), str(threads))
    rows: list[BenchRow] = []
    previous: tuple[int, dict[str, Any]] | None = None
    for size in sorted(histories):
        folder, attempts, orders = histories[size]
        train = measured[size]
        if previous is None:
            validate = run_child("validate", str(folder / "attempts.parquet"), str(folder / "nudges.parquet"))
            reference = f"read + validate alone: {validate['seconds']:.1f} s, {validate['peak_rss_mb']:.0f} MB"
            ratio = f"{train['seconds'] / validate['seconds']:.1f}x of validation"
        else:
            smaller, before = previous
            reference = f"{smaller:,} attempts: {before['seconds']:.0f} s, {before['peak_rss_mb']:,.0f} MB"
            ratio = (
                f"{attempts / smaller:.1f}x the attempts: {train['seconds'] / before['seconds']:.1f}x the time, "
                f"{train['peak_rss_mb'] / before['peak_rss_mb']:.1f}x the memory"
            )
        rows.append(
            BenchRow(
                benchmark="train",
                inputs=(
                    f"{attempts:,} attempts ({orders:,} orders, {train['decision_points']:,.0f} decision points, "
                    f"{train['partitions']:.0f} partitions), {threads} threads, episodes {episodes}/policy"
                ),
                figure=f"{train['seconds']:.0f} s end to end",
                seconds=round(train["seconds"], 1),
                peak_rss_mb=round(train["peak_rss_mb"], 0),
                reference=reference,
                ratio=ratio,
            )
        )
        previous = (attempts, train)
    return rows


def main(argv: list[str]) -> None:
    """Child entry point: run one job, print its figures as one JSON line."""
    job, *args = argv
    result = _JOBS[job](*args)
    result["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])

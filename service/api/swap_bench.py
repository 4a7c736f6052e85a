"""Benchmark: the decision API's latency while the champion moves (ISSUE: swap "with no failed or slowed request").

``winback serve`` (2 workers) answers the mixed traffic at a fixed rate while the ``champion`` alias moves
between versions of the same model, so every move is a real swap: the mirror downloads the version and each worker
loads, warms up and canary-checks it beside the requests. The requests sent within ``NEAR_SECONDS`` after a move,
and those in flight while a worker was loading (its log line of the swap says when the load began and ended), are
compared with those sent away from any move, in the same run: failures, p99 (p90 for the ~200 in flight during
loads) and the slowest one.

It works on a copy of the tracking store (a file-based SQLite one, as ``make demo`` and ``make bench`` make), in
which it registers two more versions of the champion's model; the store given is not changed.
"""

from __future__ import annotations

import contextlib
import json
import math
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from service.api.bench import (
    Sample,
    _free_port,
    _percentile,
    _run_timed,
    _wait_http,
    bench_env,
    fixed_rate,
    mixed_traffic,
    start_api_server,
    stop_servers,
)
from service.signals import sigterm_exits

#: A request sent this long after a move counts as near it (the poll, the worker's look, download, load, warm-up).
NEAR_SECONDS = 5.0
#: Requests this long before a move, or up to this long after its near window, count as neither.
MARGIN_SECONDS = 1.0


@dataclass(frozen=True)
class SwapLatency:
    """Latency of the requests near the alias moves and away from them, in one run."""

    moves: int
    swaps_logged: int  # "serving model version" lines of the workers (their first loads included)
    near_requests: int
    near_errors: int
    near_p99_ms: float
    near_max_ms: float
    away_requests: int
    away_errors: int
    away_p99_ms: float
    away_max_ms: float
    rate: float
    poll_seconds: float
    #: The requests in flight while a worker loaded a moved version (whichever worker answered them), and the
    #: swaps seen in the run: how many, and the shortest and longest load in ms. A run has a few hundred such
    #: requests, so their p90 (a p99 would be their second slowest), beside the same run's p90 away from the moves.
    during_requests: int = 0
    during_errors: int = 0
    during_p90_ms: float = math.nan
    during_max_ms: float = math.nan
    away_p90_ms: float = math.nan
    loads_in_run: int = 0
    load_ms_range: tuple[float, float] = (math.nan, math.nan)
    #: Loads that ran at the same moment as another worker's: the workers take turns (``MirrorSource.load_turn``),
    #: so this stays 0 unless a sibling's load outlasted the turn's wait.
    overlapping_loads: int = 0


def split_by_moves(samples: list[Sample], moves: list[float]) -> tuple[list[float | None], list[float | None]]:
    """The latencies (None: failed) of the requests sent within ``NEAR_SECONDS`` after a move, and of those sent
    away from every move (not within ``MARGIN_SECONDS`` before one, nor up to ``MARGIN_SECONDS`` past its near
    window); ``samples`` as ``fixed_rate`` gives them, ``moves`` in seconds from the same start."""
    near: list[float | None] = []
    away: list[float | None] = []
    for sent, took, ok in samples:
        latency = took if ok else None
        if any(move <= sent <= move + NEAR_SECONDS for move in moves):
            near.append(latency)
        elif not any(move - MARGIN_SECONDS <= sent <= move + NEAR_SECONDS + MARGIN_SECONDS for move in moves):
            away.append(latency)
    return near, away


#: The line a worker logs once a version serves (service/api/model_holder.py), with ``load_ms`` since its load began.
_SWAP_LINE = "serving model version"


def load_windows(log_text: str, started_at: float) -> list[tuple[float, float]]:
    """(began, ended) of each swap the workers logged in ``log_text`` (their JSON log lines), in seconds after
    ``started_at`` (a wall-clock time, as the lines'): negative for the ones before it. A worker's first load (from
    rules-only) is no swap: the run may start while the second worker still does it."""
    windows = []
    for line in log_text.splitlines():
        if _SWAP_LINE not in line:
            continue
        try:
            record = json.loads(line)
            ended = datetime.fromisoformat(record["time"]).timestamp() - started_at
            took = float(record["load_ms"]) / 1e3
            first_load = "(was rules-only)" in record["message"]
        except (ValueError, KeyError, TypeError):
            continue  # not one of the holder's JSON lines (e.g. a message quoting it)
        if not first_load:
            windows.append((ended - took, ended))
    return windows


def overlapping(windows: list[tuple[float, float]]) -> int:
    """How many of the load ``windows`` (began, ended) share a moment with another one: two workers loading at once
    take both cores of a small machine from the requests."""
    return sum(
        any(began <= other_end and other_began <= ended for j, (other_began, other_end) in enumerate(windows) if j != i)
        for i, (began, ended) in enumerate(windows)
    )


def during_loads(samples: list[Sample], windows: list[tuple[float, float]]) -> list[float | None]:
    """The latencies (None: failed) of the requests in flight at some moment of a load: sent before it ended and
    answered, or failed, after it began; ``samples`` as ``fixed_rate`` gives them."""
    during: list[float | None] = []
    for sent, took, ok in samples:
        if any(began <= sent + took and sent <= ended for began, ended in windows):
            during.append(took if ok else None)
    return during


def _summary(latencies: list[float | None], share: float = 0.99) -> tuple[int, int, float, float]:
    """(requests, failed, the ``share`` percentile in ms, slowest ms) of answered ones."""
    answered = sorted(latency for latency in latencies if latency is not None)
    if not answered:
        return len(latencies), len(latencies) - len(answered), math.nan, math.nan
    return (len(latencies), len(latencies) - len(answered), round(_percentile(answered, share), 2),  # ms already
            round(answered[-1] * 1e3, 2))  # fmt: skip


def copied_store(tracking_uri: str, folder: Path) -> str:
    """A copy of the file-based SQLite tracking store ``tracking_uri`` in ``folder``; its URI. ValueError for any
    other store (it cannot be copied, and this benchmark must not move the alias of a store in use)."""
    from model.registry_client import _sqlite_path

    path = _sqlite_path(tracking_uri)
    if path is None or not path.is_file():
        raise ValueError(
            f"the swap benchmark needs a file-based SQLite tracking store to copy, not {tracking_uri!r} "
            "(`make demo` or `winback train` makes one)"
        )
    copy = folder / "mlflow.db"
    shutil.copyfile(path, copy)
    return f"sqlite:///{copy}"


def versions_to_swap(tracking_uri: str, folder: Path) -> tuple[str, list[str]]:
    """Copy the store at ``tracking_uri`` into ``folder`` and register its champion's model twice more there: (the
    copy's URI, its three versions to move the alias through, the champion last). ValueError if there is no
    champion."""
    from model import registry_client as registry

    store = copied_store(tracking_uri, folder)
    champion = registry.get_alias_version(registry.CHAMPION, tracking_uri=store)
    if champion is None:
        raise ValueError(f"no champion in {tracking_uri}: train and promote a model first")
    return store, [*(registry.register_same_model(champion, tracking_uri=store) for _ in range(2)), champion]


def run_swap_bench(
    tracking_uri: str,
    *,
    workers: int = 2,
    rate: float = 300.0,
    seconds: float = 40.0,
    moves: int = 4,
    poll_seconds: float = 2.0,
) -> SwapLatency:
    """Serve ``mixed_traffic`` at ``rate`` for ``seconds`` while the champion moves ``moves`` times, evenly spaced
    (see the module's text)."""
    with sigterm_exits(), tempfile.TemporaryDirectory(prefix="winback-swap-bench-") as tmp:
        folder = Path(tmp)
        store, versions = versions_to_swap(tracking_uri, folder)
        champion = versions[-1]
        targets = [versions[index % len(versions)] for index in range(moves)]
        port = _free_port()
        env = bench_env(folder) | {"WINBACK_MODEL_POLL_SECONDS": str(poll_seconds)}
        log_path = folder / "serve.log"
        server = None
        try:
            with log_path.open("wb") as log:
                server = start_api_server(port, workers, store, env=env, folder=folder, output=log)
            _wait_http(f"http://127.0.0.1:{port}/readyz", server, 180.0,
                       ready=lambda answer: answer.json().get("model_version") == champion,
                       waiting_for=f"serve model {champion}")  # fmt: skip
            wall_clock: list[float] = []
            offsets = [seconds * (index + 1) / (moves + 1) for index in range(moves)]
            with AliasMover(store, targets, offsets, env=env, log_file=folder / "mover.log") as mover:
                mover.wait_ready(180.0)

                def start_moving() -> None:
                    wall_clock.append(time.time())  # the workers' log lines say when on the wall clock
                    mover.go()

                samples: list[Sample] = []
                url = f"http://127.0.0.1:{port}/v1/decisions"
                _run_timed(fixed_rate(url, mixed_traffic().requests, rate=rate, seconds=seconds, samples=samples,
                                      on_start=start_moving))  # fmt: skip
                moved_at = mover.moved_at(timeout=60.0)
        finally:
            stop_servers((server,), timeout=30)
        log_text = log_path.read_text(errors="replace")
    if len(moved_at) < moves:
        raise RuntimeError(f"the alias moved {len(moved_at)} times of {moves} within the run")
    windows = [(began, ended) for began, ended in load_windows(log_text, wall_clock[0]) if ended > 0.0]
    near, away = split_by_moves(samples, moved_at)
    near_figures, away_figures = _summary(near), _summary(away)
    took = [round((ended - began) * 1e3, 1) for began, ended in windows]
    during_requests, during_errors, during_p90_ms, during_max_ms = _summary(during_loads(samples, windows), 0.9)
    return SwapLatency(
        moves, log_text.count(_SWAP_LINE), *near_figures, *away_figures, rate=rate, poll_seconds=poll_seconds,
        during_requests=during_requests, during_errors=during_errors, during_p90_ms=during_p90_ms,
        during_max_ms=during_max_ms, away_p90_ms=_summary(away, 0.9)[2], loads_in_run=len(windows),
        load_ms_range=(min(took), max(took)) if took else (math.nan, math.nan), overlapping_loads=overlapping(windows),
    )  # fmt: skip


class AliasMover:
    """Moves the champion alias to ``targets[i]`` ``offsets[i]`` seconds after ``go``, from a process of its own.

    The MLflow client is Python (~8 ms of CPU a move on a slow machine, and its imports and first connection take
    a second): in the load generator's process it would hold the generator's GIL at every move, and a request
    scheduled then would be sent late and counted as the server's latency, in exactly the window this benchmark
    looks at. The child makes its first connection before it says it is ready, so the run sees only the moves."""

    def __init__(
        self, store: str, targets: list[str], offsets: list[float], *, env: dict[str, str], log_file: Path
    ) -> None:
        self.log_file = log_file
        code = "from service.api.swap_bench import _move_on_schedule; _move_on_schedule()"
        with log_file.open("wb") as log:  # MLflow's and alembic's lines; the last one says why the child failed
            self.process = subprocess.Popen(
                [sys.executable, "-c", code, store, json.dumps(targets), json.dumps(offsets)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env, text=True,
            )  # fmt: skip
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, name="winback-swap-bench-mover-output", daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line.strip())
        self._lines.put(None)  # end of output: the child is gone

    def _next_line(self, deadline: float) -> str | None:
        try:
            return self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise RuntimeError(f"the alias mover did not answer in time (its log: {self.log_file})") from None

    def _failed(self, what: str) -> RuntimeError:
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        lines = self.log_file.read_text(errors="replace").strip().splitlines()
        why = lines[-1] if lines else "no output"
        return RuntimeError(f"the alias mover {what} (exit code {self.process.returncode}): {why}")

    def wait_ready(self, timeout: float) -> None:
        """Return once the child has connected to the store; RuntimeError if it failed or took over ``timeout``."""
        deadline = time.monotonic() + timeout
        while (line := self._next_line(deadline)) != _READY:
            if line is None:
                raise self._failed("failed before the run")

    def go(self) -> None:
        """Start the child's clock (a line on its stdin: microseconds, on the generator's event loop)."""
        assert self.process.stdin is not None
        try:
            self.process.stdin.write("go\n")
            self.process.stdin.flush()
        except OSError:  # a broken pipe: it is gone
            raise self._failed("died before the run began") from None

    def moved_at(self, timeout: float) -> list[float]:
        """When each move ended, in seconds after ``go``, once the child has made them all."""
        deadline = time.monotonic() + timeout
        moved: list[float] = []
        while (line := self._next_line(deadline)) is not None:
            if line.startswith(_MOVED):  # anything else a library printed is not the child's
                moved.append(float(line.removeprefix(_MOVED)))
        try:
            returncode = self.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the alias mover did not end in time (its log: {self.log_file})") from None
        if returncode != 0:
            raise self._failed(f"failed after {len(moved)} moves")
        return moved

    def __enter__(self) -> AliasMover:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


_READY = "ready"
_MOVED = "moved "


def _move_on_schedule() -> None:
    """The alias mover's child process (``AliasMover``): argv is the store, the targets and the offsets (JSON)."""
    from model import registry_client as registry

    store, targets, offsets = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    registry.get_alias_version(registry.CHAMPION, tracking_uri=store)  # imports and first connection, before the run
    print(_READY, flush=True)
    if sys.stdin.readline().strip() != "go":
        return  # the bench is gone before its run began
    start = time.perf_counter()
    for version, offset in zip(targets, offsets, strict=True):
        time.sleep(max(0.0, start + offset - time.perf_counter()))
        registry.set_alias(registry.CHAMPION, version, tracking_uri=store)
        print(f"{_MOVED}{time.perf_counter() - start}", flush=True)


def describe(result: SwapLatency) -> str:
    """One line of figures."""
    text = latency_text
    return (
        f"{result.moves} alias moves at {result.rate:g} req/s (poll {result.poll_seconds:g} s, {result.swaps_logged} "
        f"loads logged by the workers): within {NEAR_SECONDS:g} s after a move {result.near_requests} requests, "
        f"{result.near_errors} failed, p99 {text(result.near_p99_ms)}, slowest {text(result.near_max_ms)}; "
        f"{swap_during(result)}; away from the moves {result.away_requests} requests, {result.away_errors} failed, p90 "
        f"{text(result.away_p90_ms)}, p99 {text(result.away_p99_ms)}, slowest {text(result.away_max_ms)}"
    )


def swap_during(result: SwapLatency) -> str:
    """The requests in flight during the run's swaps, in words."""
    if not result.loads_in_run:
        return "no swap logged by the workers during the run"
    shortest, longest = result.load_ms_range
    return (
        f"in flight during one of the {result.loads_in_run} swaps in the run ({shortest:g}-{longest:g} ms of loading "
        f"each, {result.overlapping_loads} at the same moment as another) {result.during_requests} requests, "
        f"{result.during_errors} failed, p90 "
        f"{latency_text(result.during_p90_ms)}, slowest {latency_text(result.during_max_ms)}"
    )


def latency_text(value: float) -> str:
    """A latency figure, or why there is none."""
    return f"{value} ms" if math.isfinite(value) else "none answered"


def swap_ratios(result: SwapLatency) -> str:
    """The in-flight requests' p90 and the slowest near a move, each against the same run away from the moves;
    a figure that could not be measured (no swap, nothing answered) is left out."""

    def ratio(figure: float, reference: float, what: str) -> str | None:
        usable = math.isfinite(figure) and math.isfinite(reference) and reference > 0
        return f"{figure / reference:.1f}x {what}" if usable else None

    parts = [
        ratio(result.during_p90_ms, result.away_p90_ms, "p90 during a load"),
        ratio(result.near_max_ms, result.away_max_ms, "slowest near a move"),
    ]
    return ", ".join(part for part in parts if part is not None) or "-"


if __name__ == "__main__":  # pragma: no cover - manual entry point; `winback bench` calls run_swap_bench
    from service.signals import restore_sigchld_default

    restore_sigchld_default()  # its servers' exits are read (the CLI's entry does the same)
    print(describe(run_swap_bench(sys.argv[1])))

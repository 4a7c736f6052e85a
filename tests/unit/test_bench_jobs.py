"""A benchmark job ends with the bench: a bench stopped while a job runs (a training run can take two hours) stops
that job before it exits, and ``winback bench`` ends through its clean-ups on a SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

#: A stand-in for ``winback bench`` running one job: SIGTERM raises SystemExit, as the command arranges.
_BENCH = textwrap.dedent(
    """
    import os, sys
    from pipelines.bench import run_job
    from service.signals import sigterm_exits

    with sigterm_exits():
        run_job([sys.executable, "-c", sys.argv[1]], dict(os.environ), stop_seconds=float(sys.argv[2]))
    """
)
#: The job: forks a worker (as a training job's pool does), writes both pids, then sleeps far longer than any
#: test; told to, both ignore SIGINT and SIGTERM.
_JOB = textwrap.dedent(
    """
    import os, signal, sys, time
    if sys.argv[2:] == ["ignore"]:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    worker = os.fork()
    if worker == 0:
        time.sleep(300)
        os._exit(0)
    open(sys.argv[1] + ".tmp", "w").write(f"{os.getpid()} {worker}")
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    time.sleep(300)
    """
)


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def _start_bench(
    tmp_path: Path, *, ignore_signals: bool, stop_seconds: float
) -> tuple[subprocess.Popen[bytes], list[int]]:
    pid_file = tmp_path / "job.pid"
    job = f"import sys; sys.argv = ['job', {str(pid_file)!r}{', ' + repr('ignore') if ignore_signals else ''}]\n" + _JOB
    bench = subprocess.Popen([sys.executable, "-c", _BENCH, job, str(stop_seconds)])
    deadline = time.monotonic() + 60
    while not pid_file.exists():
        assert time.monotonic() < deadline, "the job did not start"
        assert bench.poll() is None, f"the bench ended first ({bench.returncode})"
        time.sleep(0.05)
    return bench, [int(pid) for pid in pid_file.read_text().split()]


def _kill_all(bench: subprocess.Popen[bytes], pids: list[int]) -> None:
    for pid in (bench.pid, *pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    bench.wait(10)


@pytest.mark.parametrize("ignore_signals", [False, True], ids=["job-ends-on-sigint", "job-ignores-signals"])
def test_a_sigterm_to_the_bench_alone_stops_the_job_it_runs_and_its_workers(
    tmp_path: Path, ignore_signals: bool
) -> None:
    bench, pids = _start_bench(tmp_path, ignore_signals=ignore_signals, stop_seconds=1.0)
    try:
        bench.send_signal(signal.SIGTERM)  # to the bench's pid only, as `kill PID` or a supervisor would
        assert bench.wait(30) == 128 + signal.SIGTERM
        # Ended by its SIGINT, or killed with its group a second later when it ignores it; reaped either way.
        for pid in pids:
            assert _gone(pid, 5), f"process {pid} of the job outlived the bench"
    finally:
        _kill_all(bench, pids)


def test_a_second_sigterm_while_the_job_is_being_stopped_kills_it_at_once(tmp_path: Path) -> None:
    bench, pids = _start_bench(tmp_path, ignore_signals=True, stop_seconds=60.0)
    try:
        bench.send_signal(signal.SIGTERM)
        time.sleep(1.0)  # the bench now waits up to a minute for the job, which ignores its SIGINT
        assert bench.poll() is None
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(15) == 128 + signal.SIGTERM
        for pid in pids:
            assert _gone(pid, 5), f"process {pid} of the job outlived the bench"
    finally:
        _kill_all(bench, pids)


def test_winback_bench_ends_through_its_clean_ups_on_sigterm(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command runs under ``sigterm_exits``: a SIGTERM during it is a SystemExit(143), which passes through
    ``run_job``'s clean-up (the job stopped), not Python's default of ending at once."""
    import pipelines.cli as cli

    cleaned_up: list[str] = []

    def body(*_args: object) -> None:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # the handler raises in this thread before the sleep ends
        finally:
            cleaned_up.append("done")

    def unhandled(_signum: int, _frame: object) -> None:
        cleaned_up.append("not the command's handler")  # instead of ending the test run

    monkeypatch.setattr(cli, "_bench", body)
    before = signal.signal(signal.SIGTERM, unhandled)
    try:
        result = CliRunner().invoke(cli.app, ["bench", "--skip-api", "--skip-executor"])
        assert signal.getsignal(signal.SIGTERM) is unhandled  # put back after the command
    finally:
        signal.signal(signal.SIGTERM, before)
    assert result.exit_code == 128 + signal.SIGTERM
    assert cleaned_up == ["done"]

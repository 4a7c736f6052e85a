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
#: The job: writes its pid, then sleeps far longer than any test (ignoring SIGTERM when told to).
_JOB = textwrap.dedent(
    """
    import os, signal, sys, time
    if sys.argv[2:] == ["ignore"]:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open(sys.argv[1], "w").write(str(os.getpid()))
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


def _start_bench(tmp_path: Path, *, ignore_sigterm: bool, stop_seconds: float) -> tuple[subprocess.Popen[bytes], int]:
    pid_file = tmp_path / "job.pid"
    job = f"import sys; sys.argv = ['job', {str(pid_file)!r}{', ' + repr('ignore') if ignore_sigterm else ''}]\n" + _JOB
    bench = subprocess.Popen([sys.executable, "-c", _BENCH, job, str(stop_seconds)])
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.monotonic() < deadline, "the job did not start"
        assert bench.poll() is None, f"the bench ended first ({bench.returncode})"
        time.sleep(0.05)
    return bench, int(pid_file.read_text())


@pytest.mark.parametrize("ignore_sigterm", [False, True], ids=["job-ends-on-sigterm", "job-ignores-sigterm"])
def test_a_sigterm_to_the_bench_alone_stops_the_job_it_runs(tmp_path: Path, ignore_sigterm: bool) -> None:
    bench, job_pid = _start_bench(tmp_path, ignore_sigterm=ignore_sigterm, stop_seconds=1.0)
    try:
        bench.send_signal(signal.SIGTERM)  # to the bench's pid only, as `kill PID` or a supervisor would
        assert bench.wait(30) == 128 + signal.SIGTERM
        # Ended by its SIGTERM, or killed a second later when it ignores it; reaped by the bench either way.
        assert _gone(job_pid, 5), "the job outlived the bench"
    finally:
        for pid in (bench.pid, job_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        bench.wait(10)


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

"""`winback demo --no-serve` runs the whole recovery loop for a bounded time, and stops everything it started.

One real run (a fresh process, as `make demo` starts it): simulate + train a small history, then the sandbox
connector, fake providers, webhook receiver, API and executor worker; failed payments in, retries, nudges,
link payments, signed webhooks out. Checked against the demo's summary and, independently, its database.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("demo")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def session_members(sid: int) -> list[str]:
    """Live processes of session ``sid`` (pid and command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:
            found.append(f"{entry.name}: {command}")
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="checks for leftover processes through /proc")
def test_demo_runs_the_loop_end_to_end_and_stops_every_process(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    command = [sys.executable, "-m", "pipelines.cli", "demo", "--workdir", str(workdir), "--no-serve"]
    # 45 demo hours: a model of 300 orders may send its first links a day or two after the failures (seen: +22 h
    # to +51 h, quiet hours and send-time slots), so 20 s often saw no link at all under load.
    command += ["--orders", "300", "--episodes", "30", "--live-orders", "20", "--live-seconds", "45"]
    command += ["--port", str(free_port()), "--pay-share", "1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WINBACK_")}
    env |= {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "COLUMNS": "160"}
    # Its own session: whatever the demo starts (and its children's children) stays recognisable afterwards.
    demo = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        output, _ = demo.communicate(timeout=180)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, 9)
    text = output.decode(errors="replace")
    assert demo.returncode == 0, text[-3000:]
    assert session_members(demo.pid) == [], "processes of the demo still running"

    summary = json.loads((workdir / "live" / "summary.json").read_text())
    assert summary["processes_left"] == []
    assert set(summary["processes"]) == {"api", "executor"}
    assert summary["posted"] == 20
    assert summary["retries"] >= 1, summary
    assert summary["sandbox_calls"] >= summary["retries"], summary
    assert sum(summary["messages"].values()) >= 1, summary
    # Customers pay every link (--pay-share 1); whether the switch accepts a payment is the sandbox's draw, and
    # how many links go out in 45 s follows the box's load (seen under a loaded test run: links paid 0, declined
    # only). The page answering the payment is what this checks; paid links are counted against the database below.
    assert summary["links_paid"] + summary["links_declined"] >= 1, summary
    assert summary["webhooks"] >= 1, summary
    assert summary["webhooks_verified"] == summary["webhooks"], summary
    assert summary["one_webhook_per_terminal_order"] is True, summary

    with sqlite3.connect(workdir / "winback.db") as db:
        terminal = {row[0] for row in db.execute("SELECT order_id FROM orders WHERE state IN ('SUCCEEDED', 'FAILED')")}
        retries = db.execute("SELECT count(*) FROM transactions WHERE strategy NOT IN ('initial', 'retarget_link')")
        paid = db.execute("SELECT count(*) FROM transactions WHERE strategy = 'retarget_link' AND status = 'success'")
        assert retries.fetchone()[0] == summary["retries"]
        assert paid.fetchone()[0] == summary["links_paid"]
    assert terminal
    assert set(summary["webhooks_per_order"]) == terminal
    assert set(summary["webhooks_per_order"].values()) == {1}
    for line in ("captured nudges", "webhooks", "silent retries", "one webhook per terminal order"):
        assert line in text, text[-3000:]
    assert "stopped: api (pid" in text

"""The Makefile's targets pass on what the README says they do."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_passes_demo_args_to_winback_demo() -> None:
    """With port 8000 taken the demo says "pass --port", which `make demo` could not: DEMO_ARGS passes it on."""
    shown = subprocess.run(
        ["make", "-n", "demo", "DEMO_ARGS=--port 8001 --live-orders 5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "winback demo --workdir demo --port 8001 --live-orders 5" in shown, shown


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_help_fits_80_columns_and_keeps_every_word() -> None:
    """`make help` printed the demo's target on a 141-character line, bench's on 113 and lint's on 91."""
    shown = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    lines = shown.splitlines()
    assert max(len(line) for line in lines) <= 80, shown
    described = [
        line.removeprefix("## ") for line in (ROOT / "Makefile").read_text().splitlines() if line.startswith("## ")
    ]
    assert [line.split()[0] for line in lines if not line.startswith("           ")] == [
        line.split(":")[0] for line in described
    ], shown
    assert " ".join(shown.split()) == " ".join(" ".join(line.replace(": ", " ", 1) for line in described).split())

"""`make test` runs `pytest -n 2 --dist loadgroup`: tests marked with one `xdist_group` (the executor's durability
tests, each keeping both cores busy with four worker processes; the demo loop; dask) must run on one worker, one
after another. Under pytest 9.2 with pytest-xdist 3.8 the mark was silently ignored (xdist writes the group into
`Node._nodeid`, which pytest 9.2 no longer reads), so two such tests ran at once on two cores."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

GROUPED_MODULE = """
import pytest

pytestmark = pytest.mark.xdist_group("together")


def test_one():
    pass


def test_two():
    pass


def test_three():
    pass


def test_four():
    pass
"""


def test_a_groups_tests_run_on_one_worker_under_loadgroup(tmp_path: Path) -> None:
    (tmp_path / "test_grouped.py").write_text(GROUPED_MODULE)
    ran = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup", "-v"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    workers = re.findall(r"^\[(gw\d+)\] .*PASSED .*test_grouped\.py::test_\w+", ran.stdout, flags=re.MULTILINE)
    assert len(workers) == 4, ran.stdout
    assert len(set(workers)) == 1, f"one xdist_group ran on several workers: {workers}\n{ran.stdout}"

"""Defect hunt: the executor's and the console's log lines (README: JSON lines on stderr, e-mail addresses, phone
numbers and keys masked wherever they appear)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.factories import write_console_config


def _stderr_lines(code: str) -> list[dict[str, object]]:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ), timeout=120, check=True
    )
    lines = []
    for line in done.stderr.splitlines():
        if line.strip():
            lines.append(json.loads(line))  # a plain-text line fails here
    return lines


def test_executor_and_console_lines_in_the_scorer_are_json_and_scrubbed() -> None:
    """`winback serve` runs the executor's routes and the console: their loggers (winback.executor,
    winback.console) had no handler, so their warnings went out through Python's last-resort handler as plain
    text, unscrubbed (a customer's phone number and e-mail address in clear), and their info lines were lost."""
    code = (
        "import logging\n"
        "from service.api.logging import configure_logging\n"
        "configure_logging()\n"
        "logging.getLogger('winback.executor').warning('no answer for +919876543210 / asha@example.com')\n"
        "logging.getLogger('winback.console').info('console sign-in', extra={'agent': 'asha@example.com'})\n"
    )
    lines = _stderr_lines(code)
    assert [(line["logger"], line["level"], line["message"]) for line in lines] == [
        ("winback.executor", "WARNING", "no answer for [redacted-phone] / [redacted-email]"),
        ("winback.console", "INFO", "console sign-in"),
    ]
    assert lines[1]["agent"] == "[redacted-email]"


def test_an_executor_worker_process_logs_json_lines(tmp_path: Path) -> None:
    """`winback executor run`'s worker processes configured no logging at all: "executor worker ... is running"
    and every other info line were lost, and warnings and tracebacks (SQL parameters with the order's request,
    the customer's phone and e-mail included) went to stderr as plain, unscrubbed text."""
    config = write_console_config(tmp_path / "merchants.yaml")
    url = f"sqlite:///{tmp_path / 'winback.db'}"
    code = (
        "import sqlalchemy as sa\n"
        "from service.executor.store import make_executor_engine\n"
        "from service.migrations import upgrade\n"
        "from service.executor.worker import worker_main\n"
        f"engine = make_executor_engine({url!r}); upgrade(engine); engine.dispose()\n"
        f"worker_main({url!r}, {str(config)!r}, None, 'w-test', None, until_idle=True)\n"
    )
    lines = _stderr_lines(code)
    assert ("winback.executor", "INFO", "executor worker w-test is running") in [
        (line["logger"], line["level"], line["message"]) for line in lines
    ]

"""Structured JSON logs for the API, scrubbed of secrets and personal data.

Standard ``logging`` with a JSON formatter: each line carries the fields passed in ``extra=`` (``decision_id``,
``merchant_id``, ...). A filter masks anything that looks like a bearer key, an e-mail address or a phone number
in the message and the extra fields, as a second line of defence: the code never logs request bodies or headers.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

from service.api.inflight import hold_shared, release_shared
from service.personal_data import DIGIT_RUN, mask_personal_data

LOGGER_NAME = "winback.api"

_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime", "taskName", "color_message"}
)
_BEARER = re.compile(r"(?i)bearer\s+\S+")
_API_KEY = re.compile(r"(?<![A-Za-z0-9])wb_[A-Za-z0-9_\-]{4,}")  # also after "_": "ord_wb_live_..."
# Anything that needs masking holds one of these (``suspect``): text without any is left as it is (one scan
# instead of four substitutions; most values logged are ids and names). Once one case-insensitive alternation,
# ``(?i)bearer|wb_|`` + SUSPECT, tried in full at every character (25k instructions a decision more than now, of
# ~4M, callgrind); ``in`` scans for a substring, and a pattern that starts with a digit skips to the digits.
_DIGIT_RUN = re.compile(DIGIT_RUN)


def suspect(text: str) -> bool:
    """Whether ``text`` holds ``@``, a run of digits (``SUSPECT``), or ``bearer`` or ``wb_`` in any case: their
    letters match nothing case-insensitively but their own upper and lower case, so the lower-cased text has them."""
    if "@" in text or _DIGIT_RUN.search(text) is not None:
        return True
    lowered = text.lower()
    return "bearer" in lowered or "wb_" in lowered


_SECRET_KEYS = frozenset({"authorization", "api_key", "key", "token", "phone", "email", "password", "secret"})


def scrub(text: str) -> str:
    """Mask bearer keys, winback API keys, e-mail addresses and phone numbers (service.personal_data) in ``text``."""
    if not suspect(text):
        return text
    text = _BEARER.sub("Bearer [redacted]", text)
    text = _API_KEY.sub("[redacted-key]", text)
    return mask_personal_data(text, email=_redacted_email, phone=_redacted_phone)


def _redacted_email(_: str) -> str:
    return "[redacted-email]"


def _redacted_phone(_: str) -> str:
    return "[redacted-phone]"


def _clean(key: str, value: Any) -> Any:
    if key.lower() in _SECRET_KEYS:
        return "[redacted]"
    if isinstance(value, str):
        return scrub(value)
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and every ``extra`` field."""

    def __init__(self) -> None:
        super().__init__()
        self._second: tuple[int, str] = (-1, "")  # (a second, that second as ISO text): one per second, not per line

    def _time(self, created: float) -> str:
        """``created`` as ISO 8601 in UTC to the millisecond, e.g. ``2026-11-01T10:15:00.123+00:00``."""
        second = int(created)
        cached = self._second
        if cached[0] != second:
            cached = self._second = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
        return f"{cached[1]}.{int((created - second) * 1000):03d}+00:00"

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": self._time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": scrub(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and key[:1] != "_":
                payload[key] = _clean(key, value)
        if record.exc_info:
            payload["exception"] = scrub(self.formatException(record.exc_info))
        return orjson.dumps(payload, default=str).decode()


class SharedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]  # its stream's type is not ours to fix
    """A stream handler whose lock every thread takes, the requests' decision lines included: a model load that logs
    does not give way to the requests while it holds that lock (``hold_shared``, service/api/inflight.py), where
    a request's log line would wait for the load."""

    def handle(self, record: logging.LogRecord) -> bool:
        hold_shared()  # two calls, not a context manager's five: every decision's log line comes here
        try:
            return bool(super().handle(record))
        finally:
            release_shared()


#: What alembic logs each time it opens a migration context, whether or not anything is migrated.
_MIGRATION_PREAMBLE = frozenset({"Context impl %s.", "Will assume %s DDL."})


def _without_migration_preamble(record: logging.LogRecord) -> bool:
    return record.msg not in _MIGRATION_PREAMBLE


def configure_logging(level: str = "INFO") -> logging.Logger:
    """Route winback's, uvicorn's and MLflow's loggers to stderr as JSON; idempotent (safe in every worker and
    test)."""
    # MLflow installs its own plain-text handlers when it is first imported unless told not to (mlflow/__init__.py):
    # set before any import of it here, and by `winback serve` for its workers.
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    handler = SharedStreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in (LOGGER_NAME, "uvicorn", "uvicorn.error", "mlflow", "alembic"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False
    # The rest of winback's loggers (winback.executor, winback.console, ...) through the same handler: without one
    # their warnings went out through Python's last-resort handler as plain, unscrubbed text, and their info lines
    # were lost. They still propagate (the root logger has no handler of ours; a test's capture sits there).
    package = logging.getLogger(LOGGER_NAME.split(".", 1)[0])
    package.handlers[:] = [handler]
    package.setLevel(level)
    # MLflow's own lines (it prints plain text to stderr otherwise, unscrubbed, a traceback per failed registry
    # check) come as JSON too; its routine INFO lines are left out, the scorer logs what it did with the model.
    logging.getLogger("mlflow").setLevel(max(logging.WARNING, logging.getLevelName(level)))
    # Alembic (1.18 and later) says "setup plugin alembic.autogenerate.<name>" for each of its seven plugins when
    # its autogenerate package is first imported: nothing about our database, yet seven lines at every executor
    # start. Its migration lines ("Running upgrade ...") stay.
    logging.getLogger("alembic.runtime.plugins").setLevel(max(logging.WARNING, logging.getLevelName(level)))
    # Alembic opens every migration context with "Context impl SQLiteImpl." and "Will assume non-transactional DDL.":
    # MLflow's store checks its schema that way in every process that opens it, so these two lines came at every
    # start of the scorer and of each executor worker, with nothing migrated. Shown at DEBUG; "Running upgrade ..."
    # lines, when a migration does run, stay.
    migration = logging.getLogger("alembic.runtime.migration")
    if logging.getLevelName(level) <= logging.DEBUG:
        migration.removeFilter(_without_migration_preamble)
    else:
        migration.addFilter(_without_migration_preamble)  # once: a filter already there is not added again
    # Access logs repeat what the decision log line says, slower; keep them at warnings only.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    return logging.getLogger(LOGGER_NAME)

"""Structured JSON logs for the API, scrubbed of secrets and personal data.

Standard ``logging`` with a JSON formatter: each line carries the fields passed in ``extra=`` (``decision_id``,
``merchant_id``, ...). A filter masks anything that looks like a bearer key, an e-mail address or a phone number
in the message and the extra fields, as a second line of defence: the code never logs request bodies or headers.
"""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

LOGGER_NAME = "winback.api"

_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime", "taskName", "color_message"}
)
_BEARER = re.compile(r"(?i)bearer\s+\S+")
_API_KEY = re.compile(r"\bwb_[A-Za-z0-9_\-]{4,}")
_EMAIL = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}")
_PHONE = re.compile(r"(?<![\w.])\+?\d[\d \-()]{7,}\d(?![\w.])")
_SECRET_KEYS = frozenset({"authorization", "api_key", "key", "token", "phone", "email", "password", "secret"})


def scrub(text: str) -> str:
    """Mask bearer keys, winback API keys, e-mail addresses and phone numbers in ``text``."""
    text = _BEARER.sub("Bearer [redacted]", text)
    text = _API_KEY.sub("[redacted-key]", text)
    text = _EMAIL.sub("[redacted-email]", text)
    return _PHONE.sub("[redacted-phone]", text)


def _clean(key: str, value: Any) -> Any:
    if key.lower() in _SECRET_KEYS:
        return "[redacted]"
    if isinstance(value, str):
        return scrub(value)
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and every ``extra`` field."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": scrub(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                payload[key] = _clean(key, value)
        if record.exc_info:
            payload["exception"] = scrub(self.formatException(record.exc_info))
        return orjson.dumps(payload, default=str).decode()


def configure_logging(level: str = "INFO") -> logging.Logger:
    """Route winback's and uvicorn's loggers to stderr as JSON; idempotent (safe in every worker and test)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in (LOGGER_NAME, "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False
    # Access logs repeat what the decision log line says, slower; keep them at warnings only.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    return logging.getLogger(LOGGER_NAME)

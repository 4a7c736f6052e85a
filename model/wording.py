"""How counts and figures read in what winback prints: "1 stop", "2 stops", never "1 stops"; "-", never "nan".

In ``model`` because both sides print them: ``pipelines`` (the CLI) and ``service`` (the demo, the API bench), which
may not import each other.
"""

from __future__ import annotations

import math
import numbers
from datetime import UTC, datetime, timedelta

__all__ = [
    "LINE_WIDTH",
    "MISSING",
    "count_noun",
    "figure",
    "first_line",
    "labelled_lines",
    "span_words",
    "utc_second",
]

#: A figure a table has no value for (NaN: not measured, nothing to compare with): a dash, not "nan" or "n/a".
MISSING = "-"


def utc_second(moment: datetime) -> str:
    """``2026-11-01T10:15:00Z``: a moment as an operator reads it (the CLI's lists, the executor's notes), in UTC to
    the second (microseconds and ``+00:00`` only made lines longer and harder to grep). A naive one is UTC, as
    everything stored is."""
    aware = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return aware.strftime("%Y-%m-%dT%H:%M:%SZ")


def span_words(span: timedelta) -> str:
    """A length of time as an operator's note says it: "1 day", "2 hours 30 minutes", "45 seconds", never Python's
    "1 day, 0:00:00". Whole seconds; a negative span is written as its length."""
    seconds = abs(round(span.total_seconds()))
    parts = []
    for unit, size in (("day", 86_400), ("hour", 3_600), ("minute", 60), ("second", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(count_noun(count, unit))
    return " ".join(parts) or "0 seconds"


def figure(value: object, spec: str = "") -> str:
    """``value`` formatted by ``spec`` (``format(value, spec)``) as a table cell; :data:`MISSING` for None or NaN."""
    if value is None or (isinstance(value, numbers.Real) and math.isnan(value)):
        return MISSING
    return format(value, spec)


def count_noun(count: int, noun: str, plural: str | None = None) -> str:
    """``count`` (thousands separated) and ``noun``, singular for exactly one: "1 stop", "13,005 nudges".

    ``plural`` is for a noun that does not take an "s": ``count_noun(n, "retry", "retries")``.
    """
    word = noun if count == 1 else (plural if plural is not None else f"{noun}s")
    return f"{count:,} {word}"


#: The width winback lays out its plain lines for: an ordinary terminal's.
LINE_WIDTH = 80
#: Where a labelled line's value starts: two spaces, the label padded to 15, a space.
_VALUE_COLUMN = 18


def labelled_lines(label: str, value: str, note: str = "", *, width: int = LINE_WIDTH) -> list[str]:
    """One entry of a list like the demo's "where to look": ``label``, ``value`` (an address, a path, a command)
    and ``note`` in parentheses, on one line when it fits ``width``; else the note under the value, or the value
    on a line of its own under the label, so a long path or URL stays whole and copyable. A value wider than a
    line by itself is left whole for the terminal to wrap."""
    noted = f"  ({note})" if note else ""
    beside = f"  {label:<{_VALUE_COLUMN - 3}} {value}"
    if len(beside + noted) <= width:
        return [beside + noted]
    note_below = [f"{'':<{_VALUE_COLUMN}}({note})"] if note else []
    if len(beside) <= width:
        return [beside, *note_below]
    above = f"  {label}{noted}".rstrip()
    return [above, f"    {value}"] if above else [f"    {value}"]


def first_line(error: BaseException) -> str:
    """An error's first non-blank line, stripped (a database error goes on with its SQL and parameters), or its
    type's name when its message is empty: what a one-line refusal quotes of it."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)

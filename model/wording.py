"""How counts and figures read in what winback prints: "1 stop", "2 stops", never "1 stops"; "-", never "nan".

In ``model`` because both sides print them: ``pipelines`` (the CLI) and ``service`` (the demo, the API bench), which
may not import each other.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["MISSING", "count_noun", "figure"]

#: A figure a table has no value for (NaN: not measured, nothing to compare with): a dash, not "nan" or "n/a".
MISSING = "-"


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

"""How counts read in what winback prints: "1 stop", "2 stops", never "1 stops".

In ``model`` because both sides print counts: ``pipelines`` (the CLI) and ``service`` (the demo), which may not import
each other.
"""

from __future__ import annotations

__all__ = ["count_noun"]


def count_noun(count: int, noun: str, plural: str | None = None) -> str:
    """``count`` (thousands separated) and ``noun``, singular for exactly one: "1 stop", "13,005 nudges".

    ``plural`` is for a noun that does not take an "s": ``count_noun(n, "retry", "retries")``.
    """
    word = noun if count == 1 else (plural if plural is not None else f"{noun}s")
    return f"{count:,} {word}"

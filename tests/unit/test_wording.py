"""How counts read in what winback prints."""

from __future__ import annotations

import pytest

from model.wording import count_noun


@pytest.mark.parametrize(
    ("count", "noun", "plural", "expected"),
    [
        (1, "stop", None, "1 stop"),
        (0, "stop", None, "0 stops"),
        (2, "failed order", None, "2 failed orders"),
        (13005, "nudge", None, "13,005 nudges"),
        (1, "retry", "retries", "1 retry"),
        (3, "retry", "retries", "3 retries"),
    ],
)
def test_count_noun_is_singular_for_exactly_one(count: int, noun: str, plural: str | None, expected: str) -> None:
    assert count_noun(count, noun, plural) == expected

"""JSON bodies that write a key twice in one object (service/json_keys.py)."""

from __future__ import annotations

import json

import pytest

from service.json_keys import RepeatedKeyError, loads_refusing_repeated_keys


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ('{"amount": 1, "amount": 100}', ("amount",)),
        ('{"a": {"b": [0, {"c": 1, "d": 2, "c": 3}]}}', ("a", "b", 1, "c")),
        ('[[{"x": 1}], [{"y": 1, "y": 1}]]', (1, 0, "y")),  # equal values too: the sender wrote it twice
        # The first in the document's order, though the inner object is parsed first.
        ('{"outer": {"k": 1, "k": 2}, "outer": 3}', ("outer",)),
        ('{"first": {"k": 1, "k": 2}, "second": {"j": 1, "j": 2}}', ("first", "k")),
    ],
)
def test_a_key_written_twice_is_refused_with_its_path(text: str, path: tuple[int | str, ...]) -> None:
    with pytest.raises(RepeatedKeyError) as refused:
        loads_refusing_repeated_keys(text.encode())
    assert refused.value.path == path
    assert str(refused.value).startswith(f"key {'.'.join(map(str, path))} written twice in one object")


@pytest.mark.parametrize("text", ['{"a": 1, "b": {"a": 2}}', "[]", '"x"', '[{"a": 1}, {"a": 1}]', "{}"])
def test_a_body_without_repeats_reads_as_json_reads_it(text: str) -> None:
    assert loads_refusing_repeated_keys(text) == json.loads(text)


def test_text_that_is_no_json_is_json_s_own_error() -> None:
    with pytest.raises(json.JSONDecodeError):
        loads_refusing_repeated_keys(b'{"a": ')

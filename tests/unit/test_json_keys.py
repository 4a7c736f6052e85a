"""JSON bodies that write a key twice in one object (service/json_keys.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.datafiles import DEMO_REQUEST_FILE
from model.requests import DecisionRequest
from service.api.fastpath import decision_keys_read
from service.json_keys import (
    RepeatedKeyError,
    keys_read,
    keys_written_at_most,
    loads_refusing_repeated_keys,
    repeats_a_key,
)
from tests.factories import make_request


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


def _repeats_by_hook(text: bytes) -> bool:
    """The reference: a hook on every object, whatever the count says."""
    repeated = False

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal repeated
        repeated |= len({key for key, _ in items}) < len(items)
        return dict(items)

    json.loads(text, object_pairs_hook=pairs)
    return repeated


_KEYS = st.text(alphabet='ab":\\ \u00e9\n', max_size=3)
_SPACE = st.sampled_from(["", " ", "\n  ", "\t"])


@st.composite
def _documents(draw: st.DrawFn, depth: int = 0) -> str:
    """JSON text whose objects may write a key twice, with any whitespace, keys and strings holding quotes and
    colons, escaped as ``json`` does or as ``\\u`` escapes."""
    ascii_only = draw(st.booleans())
    if depth >= 3 or draw(st.integers(0, 2)) == 0:
        return json.dumps(draw(st.one_of(st.integers(), _KEYS, st.none())), ensure_ascii=ascii_only)
    space = draw(_SPACE)
    if draw(st.booleans()):
        items = draw(st.lists(_documents(depth + 1), max_size=3))
        return "[" + space + ("," + space).join(items) + "]"
    keys = draw(st.lists(_KEYS, max_size=4))
    members = [
        json.dumps(key, ensure_ascii=ascii_only) + draw(_SPACE) + ":" + space + draw(_documents(depth + 1))
        for key in keys
    ]
    return "{" + space + ("," + space).join(members) + "}"


@settings(max_examples=400, deadline=None)
@given(_documents())
def test_the_count_before_the_parse_never_lets_a_repeat_through(text: str) -> None:
    body = text.encode()
    repeats = _repeats_by_hook(body)
    assert repeats_a_key(body, keys_read(json.loads(body))) is repeats
    if repeats:
        with pytest.raises(RepeatedKeyError):
            loads_refusing_repeated_keys(body)
    else:
        assert loads_refusing_repeated_keys(body) == json.loads(body)


@pytest.mark.parametrize(
    "text",
    [
        '{"a": 1, "a": 2, "b": "\\u0022:"}',  # an escaped quote the count does not see, where a re-serialisation would
        '{"a" :1, "a"\n: 2}',  # whitespace between a key and its colon
        '{"a": {"k": 1, "k": 2}, "s": "\\":\\":"}',
    ],
)
def test_bodies_that_would_fool_a_plain_count_are_refused(text: str) -> None:
    keys = keys_read(json.loads(text))
    assert repeats_a_key(text.encode(), keys)
    assert repeats_a_key(text.encode("utf-16"), keys)


def test_a_decision_request_is_cleared_by_the_count_alone() -> None:
    """The decision fast path pays only for the count on the requests callers send (no second parse)."""
    for body in (DEMO_REQUEST_FILE.read_bytes(), make_request().model_dump_json().encode()):
        request = DecisionRequest.model_validate_json(body)
        assert keys_written_at_most(body) == decision_keys_read(request) == keys_read(request)
        assert keys_read(request) == keys_read(json.loads(body))
        pretty = json.dumps(json.loads(body), indent=2).encode()
        assert keys_written_at_most(pretty) == decision_keys_read(DecisionRequest.model_validate_json(pretty))
    # An extra's name is counted; what it holds is left to the second parse.
    with_extras = make_request().model_dump(mode="json") | {"note": "x"}
    with_extras["failure"]["raw"] = "y"
    body = json.dumps(with_extras).encode()
    assert keys_written_at_most(body) == decision_keys_read(DecisionRequest.model_validate_json(body))
    with_extras["failure"]["raw"] = {"c": 1, "d": {"e": 2}}
    body = json.dumps(with_extras).encode()
    assert keys_written_at_most(body) > decision_keys_read(DecisionRequest.model_validate_json(body))
    assert not repeats_a_key(body, decision_keys_read(DecisionRequest.model_validate_json(body)))

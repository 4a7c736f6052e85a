"""JSON bodies that write a key twice in one object, refused rather than read.

Python's ``json`` (and so FastAPI and Starlette) keeps the last of two equal keys without a word: an event sent
as ``{"amount": 1, "amount": 100}`` was taken as 100. RFC 8259 (section 4) says names "SHOULD be unique" and that
receivers of such an object differ (the last pair only, an error, or every pair): a body that may mean one thing
to the merchant's switch and another to winback is refused, naming the key's path (data/README.md).

The executor's routes and the decision API's routes read their bodies through ``UniqueKeysRoute``; the decision
fast path (api/fastpath.py) hands a body that writes a key twice to its route. Telling whether a body repeats a key
costs a full parse with a hook per object (3% of a decision): a count first rules it out for nearly every body,
and only a body the count cannot clear is parsed that way (``keys_written_at_most`` against the keys read).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel

#: JSON's whitespace (RFC 8259 section 2) read as quotes: a key's closing quote, whitespace and colon become ``":``.
_WHITESPACE_AS_QUOTES = bytes.maketrans(b" \t\n\r", b'""""')


class RepeatedKeyError(ValueError):
    """A JSON object writes a key twice; ``path`` leads from the document's top to that key."""

    #: What is wrong with the key at ``path``, and what to do.
    reason = "written twice in one object: one of its values would be dropped without a word; send the key once"

    def __init__(self, path: tuple[int | str, ...]) -> None:
        self.path = path
        super().__init__(f"key {'.'.join(str(part) for part in path)} {self.reason}")


class _WithRepeatedKey(dict[str, Any]):
    """An object of the document that wrote ``repeated`` twice (marked while parsing, found by its path after)."""

    repeated: str


def keys_written_at_most(text: bytes) -> int | None:
    """At least as many as the keys the JSON ``text`` writes, repeats included, counted without parsing it (None: not
    UTF-8, which this count needs).

    Every key is a string followed by a colon, whitespace apart: with each whitespace byte read as a quote, a quote
    stands right before each key's colon. Any other quote before a colon is inside a string (an escaped quote, a
    string beginning with a colon, whitespace before a colon), so it only makes the count larger. Equal to the keys
    read from ``text`` (each object's distinct keys, or fewer), it proves that no object wrote a key twice."""
    if b"\x00" in text[:4]:  # UTF-16 or UTF-32 (json.detect_encoding): a quote and a colon are not those bytes
        return None
    return text.translate(_WHITESPACE_AS_QUOTES).count(b'":')


def keys_read(value: Any) -> int:
    """The keys ``value`` was read from: each object's distinct keys, in a parsed JSON document (dicts and lists), or
    in a model validated from one (the fields it was given, its extras and what they hold). Never more than the keys
    the document wrote; fewer when an object wrote one twice."""
    count = 0
    stack = [value]
    while stack:
        node = stack.pop()
        kind = type(node)
        if kind is dict:
            count += len(node)
            stack.extend([child for child in node.values() if type(child) not in _LEAVES])
        elif kind is list:
            stack.extend([child for child in node if type(child) not in _LEAVES])
        elif _is_model(kind):
            given = node.__pydantic_fields_set__  # the extras' names too
            count += len(given)
            fields = node.__dict__
            stack.extend([child for name in given if type(child := fields.get(name)) not in _LEAVES])
            if extra := node.__pydantic_extra__:
                stack.extend(extra.values())
    return count


#: Values that hold no key: the JSON scalars, as parsed or validated (a timestamp, an open vocabulary's enum).
_LEAVES = frozenset({str, int, float, bool, type(None), datetime})
_MODEL_KINDS: dict[type, bool] = {}


def _is_model(kind: type) -> bool:
    """Whether ``kind`` is a pydantic model (remembered per type: isinstance of BaseModel's ABC metaclass is slow)."""
    known = _MODEL_KINDS.get(kind)
    if known is None:
        known = _MODEL_KINDS[kind] = issubclass(kind, BaseModel)
    return known


def repeats_a_key(text: bytes, keys: int) -> bool:
    """Whether the JSON ``text``, whose reading read ``keys`` keys (``keys_read`` of the parsed document or of the
    model validated from it), writes a key twice in one object. Only a body whose keys the count cannot clear is
    parsed again; one that does not parse (a model's parser took what ``json`` does not) is not said to repeat one."""
    if keys_written_at_most(text) == keys:
        return False
    try:
        loads_refusing_repeated_keys(text)
    except RepeatedKeyError:
        return True
    except (ValueError, RecursionError):
        return False
    return False


def loads_refusing_repeated_keys(text: bytes | str) -> Any:
    """``json.loads(text)``, but RepeatedKeyError when an object writes a key twice (json.JSONDecodeError for text
    that is no JSON, as ever)."""
    if isinstance(text, bytes):
        document = json.loads(text)
        if keys_written_at_most(text) == keys_read(document):
            return document
    marked = False

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal marked
        value = dict(items)
        if len(value) == len(items):
            return value
        marked = True
        with_repeat = _WithRepeatedKey(value)
        seen: set[str] = set()
        for key, _ in items:
            if key in seen:
                with_repeat.repeated = key
                break
            seen.add(key)
        return with_repeat

    document = json.loads(text, object_pairs_hook=pairs)
    path = _path_of_repeat(document, ()) if marked else None
    if path is not None:
        raise RepeatedKeyError(path)
    return document


def _path_of_repeat(value: Any, path: tuple[int | str, ...]) -> tuple[int | str, ...] | None:
    """The path of the first key written twice, in the document's order (None when ``value`` holds none)."""
    if isinstance(value, _WithRepeatedKey):
        return (*path, value.repeated)
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        if (found := _path_of_repeat(child, (*path, key))) is not None:
            return found
    return None


class _UniqueKeysRequest(Request):
    async def json(self) -> Any:
        # Starlette's own cache attribute, as FastAPI's "Custom Request and APIRoute class" recipe overrides body().
        if not hasattr(self, "_json"):
            self._json = loads_refusing_repeated_keys(await self.body())
        return self._json


class UniqueKeysRoute(APIRoute):
    """A route whose JSON body may not write a key twice in one object. FastAPI answers the RepeatedKeyError its
    JSON reading raises with a 400 caused by it, which the app's handler turns into the 422 naming the key."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def refusing_repeated_keys(request: Request) -> Response:
            return await handle(_UniqueKeysRequest(request.scope, request.receive))

        return refusing_repeated_keys

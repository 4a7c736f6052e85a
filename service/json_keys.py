"""JSON bodies that write a key twice in one object, refused rather than read.

Python's ``json`` (and so FastAPI and Starlette) keeps the last of two equal keys without a word: an event sent
as ``{"amount": 1, "amount": 100}`` was taken as 100. RFC 8259 (section 4) says names "SHOULD be unique" and that
receivers of such an object differ (the last pair only, an error, or every pair): a body that may mean one thing
to the merchant's switch and another to winback is refused, naming the key's path (data/README.md).

The executor's routes and the decision API's ``/v1/outcomes`` read their bodies through ``UniqueKeysRoute``;
``/v1/decisions`` (and ``:batch``) does not (its hot path pays for every parse), which is the owner's call.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute


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


def loads_refusing_repeated_keys(text: bytes | str) -> Any:
    """``json.loads(text)``, but RepeatedKeyError when an object writes a key twice (json.JSONDecodeError for text
    that is no JSON, as ever)."""
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

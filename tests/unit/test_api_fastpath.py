"""The decision route's fast path answers exactly as the documented FastAPI route, and hands everything else on."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest

from service.api.app import serving_app
from service.api.fastpath import MAX_FAST_BODY, MAX_REQUEST_BODY
from tests.unit.test_api import DEMO_KEY, Api, request_body, start
from tests.unit.test_api import api as api  # the started-app fixture, shared with test_api.py

FAST = {"Authorization": f"Bearer {DEMO_KEY}", "Content-Type": "application/json"}
# Any other spelling of the JSON content type goes the documented way (FastAPI's route).
DOCUMENTED = {"Authorization": f"Bearer {DEMO_KEY}", "Content-Type": "application/json; charset=utf-8"}


@pytest.fixture
def two_apps(tmp_path: Path) -> Iterator[tuple[Api, Api]]:
    # Same seed: the same sequence of decision ids and exploration draws in both.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = start(tmp_path / "a"), start(tmp_path / "b")
    yield first, second
    first.close()
    second.close()


def _body(**overrides: object) -> bytes:
    return json.dumps(request_body(**overrides), separators=(",", ":")).encode()


def _latin1_body() -> bytes:
    """A request as a switch encoding Latin-1 sends it: "refusée" with its é as the one byte 0xE9."""
    return _body(note="Carte refusée").replace(b"\\u00e9", b"\xe9")


def test_fast_path_answers_byte_for_byte_as_the_documented_route(two_apps: tuple[Api, Api]) -> None:
    fast_api, documented_api = two_apps
    for body in (_body(), _body(amount=12.5, currency="USD"), _body(history={"attempts": [], "nudges": []})):
        fast = fast_api.post_raw("/v1/decisions", body, FAST)
        documented = documented_api.post_raw("/v1/decisions", body, DOCUMENTED)
        assert fast.status_code == documented.status_code == 200
        # Decision ids are fresh on every answer (whatever the seed); everything else is the same bytes.
        fast_id, documented_id = fast.json()["decision_id"], documented.json()["decision_id"]
        assert fast_id != documented_id
        assert fast.content.replace(fast_id.encode(), documented_id.encode()) == documented.content
        assert fast.headers["content-type"] == documented.headers["content-type"] == "application/json"
        assert fast.headers["content-length"] == documented.headers["content-length"]


def test_fast_path_stores_and_counts_the_decision(api: Api) -> None:
    answer = api.post_raw("/v1/decisions", _body(), FAST)
    api.flush()
    assert api.runtime.store is not None
    stored = api.runtime.store.get_decision(answer.json()["decision_id"])
    assert stored is not None
    assert stored["answer"] == json.loads(answer.content)
    metrics = api.get("/metrics").text
    assert 'winback_http_request_duration_seconds_count{method="POST",route="/v1/decisions",status="200"} 1.0' in (
        metrics
    )
    assert "winback_decisions_total{" in metrics


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        ({"Content-Type": "application/json"}, _body(), 401),  # no key
        ({"Authorization": "Bearer wb_unknown_key", "Content-Type": "application/json"}, _body(), 401),
        ({"Authorization": "Basic abc", "Content-Type": "application/json"}, _body(), 401),
        (FAST, _body(merchant_id="m_other"), 403),  # another merchant's id
        (FAST, b'{"merchant_id": "m_demo"', 422),  # not JSON
        (FAST, _body().replace(b'"amount":499.0', b'"amount":"lots"'), 422),
        (FAST, _latin1_body(), 422),
    ],
)
def test_what_the_fast_path_refuses_gets_the_documented_routes_error(
    two_apps: tuple[Api, Api], headers: dict[str, str], body: bytes, status: int
) -> None:
    fast_api, documented_api = two_apps
    through_middleware = fast_api.post_raw("/v1/decisions", body, headers)
    documented_headers = headers | {"Content-Type": "application/json; charset=utf-8"}
    documented = documented_api.post_raw("/v1/decisions", body, documented_headers)
    assert through_middleware.status_code == documented.status_code == status
    assert through_middleware.json() == documented.json()


@pytest.mark.parametrize("path", ["/v1/decisions", "/v1/decisions:batch", "/v1/outcomes"])
def test_a_body_not_in_utf8_is_a_422_naming_the_body_not_a_bare_400(api: Api, path: str) -> None:
    """A merchant's switch sending Latin-1 got FastAPI's 400 "There was an error parsing the body", which named
    neither the field nor the reason; bad JSON was a 422 already."""
    body = _latin1_body()
    answer = api.post_raw(path, b"[" + body + b"]" if path.endswith(":batch") else body, FAST)
    assert answer.status_code == 422, answer.text
    offset = body.index(b"\xe9") + path.endswith(":batch")  # the batch's "[" comes first
    expected = f"body is not UTF-8 (JSON is sent as UTF-8): byte {offset} is not"
    assert answer.json()["detail"] == [{"field": "body", "msg": expected, "type": "value_error", "loc": ["body"]}]
    assert "refus" not in answer.text


def test_a_body_above_the_fast_paths_limit_is_answered_by_the_documented_route(api: Api) -> None:
    padding = "x" * (MAX_FAST_BODY + 1)
    answer = api.post_raw("/v1/decisions", _body(note=padding), FAST)
    assert answer.status_code == 200, answer.text
    assert answer.json()["decision_id"].startswith("dec_")


@pytest.mark.parametrize("bad", [-1, "3", 2.5])
def test_an_extra_field_the_rules_cannot_use_is_a_422_naming_it_not_a_500(api: Api, bad: object) -> None:
    answer = api.post_raw("/v1/decisions", _body(card_reattempts_30d=0).replace(b'"card_reattempts_30d":0',
                          f'"card_reattempts_30d":{json.dumps(bad)}'.encode()), FAST)  # fmt: skip
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"][0]["field"] == "card_reattempts_30d"
    assert answer.json()["message"].startswith("card_reattempts_30d: card_reattempts_30d must be a non-negative")
    api.flush()
    assert api.runtime.store is not None
    assert api.runtime.store.decisions_for_order("m_demo", "ord_8KQ2") == []  # nothing stored for it


def test_a_batch_item_the_rules_cannot_use_is_a_422_naming_its_index_and_nothing_of_the_batch_is_stored(
    api: Api,
) -> None:
    good = json.loads(_body())
    bad = {**good, "order_id": "ord_bad", "card_reattempts_30d": -1}
    answer = api.post("/v1/decisions:batch", [good, bad])
    assert answer.status_code == 422, answer.text
    assert [(d["field"], d["loc"]) for d in answer.json()["detail"]] == [
        ("[1].card_reattempts_30d", ["body", 1, "card_reattempts_30d"])
    ]
    api.flush()
    assert api.runtime.store is not None
    assert api.runtime.store.decisions_for_order("m_demo", good["order_id"]) == []  # item 0 was not kept


def test_a_failure_after_a_decision_is_queued_neither_fails_the_request_nor_stores_it_twice(api: Api) -> None:

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("metrics backend broke")

    api.runtime.metrics.observe_decision = broken  # type: ignore[method-assign]
    answer = api.post_raw("/v1/decisions", _body(), FAST)
    assert answer.status_code == 200, answer.text
    api.flush()
    assert api.runtime.store is not None
    stored = api.runtime.store.decisions_for_order("m_demo", json.loads(_body())["order_id"])
    assert [row["decision_id"] for row in stored] == [answer.json()["decision_id"]]


def _nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def _with(body: bytes, **fields: object) -> bytes:
    data = json.loads(body)
    for path, value in fields.items():
        *parents, last = path.split("__")
        node = data
        for parent in parents:
            node = node[parent]
        node[last] = value
    return json.dumps(data, separators=(",", ":")).encode()


# Found by a black-box probe written from CONTRACT.md: each used to be a 500, or was read as something else.
@pytest.mark.parametrize(
    ("body", "field"),
    [
        (_with(_body(), event_time="9999-12-31T23:59:59Z"), "event_time"),  # used to overflow: a 500
        (_with(_body(), event_time="0001-01-01T00:00:00+14:00"), "event_time"),
        (_with(_body(), event_time=1793528100), "event_time"),  # an epoch number, not an ISO timestamp
        (_with(_body(), amount=True), "amount"),  # read as 1.0
        (_with(_body(), amount="49.0"), "amount"),
        (_with(_body(), payment__is_recurring="yes"), "payment.is_recurring"),  # read as true
        (_with(_body(), customer__phone_present=1), "customer.phone_present"),
        (_with(_body(), order_id="   "), "order_id"),
        (_with(_body(), currency="   "), "currency"),
        (_with(_body(), note=_nested(300)), "body"),  # too deep to store: used to be a 500
        (_body()[:-1] + b',"note":' + b"[" * 5000 + b"]" * 5000 + b"}", "body"),  # too deep to parse: was a 400
        (_with(_body(), event_time="1793528100"), "event_time"),  # an epoch in a string: still not ISO 8601
        # a lone UTF-16 surrogate: valid JSON escape, not storable Unicode (was a 500)
        (_body().replace(b'"error_message":"', b'"error_message":"\\udc00', 1), "failure.error_message"),
        (_body()[:-1] + b',"note":{"deep":["\\ud800"]}}', "note.deep[0]"),
    ],
)
def test_input_pydantic_would_coerce_or_cannot_store_is_a_422_naming_the_field(
    two_apps: tuple[Api, Api], body: bytes, field: str
) -> None:
    for harness, headers in zip(two_apps, (FAST, DOCUMENTED), strict=True):
        answer = harness.post_raw("/v1/decisions", body, headers)
        assert answer.status_code == 422, answer.text
        assert [detail["field"] for detail in answer.json()["detail"]] == [field], answer.text


@pytest.mark.parametrize("history", [None, {"attempts": None, "nudges": None}])
def test_a_null_history_or_list_is_an_empty_one(api: Api, history: object) -> None:
    answer = api.post_raw("/v1/decisions", _with(_body(), history=history), FAST)
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("depth", [300, 5000])
def test_an_outcome_with_an_extra_too_deep_to_store_is_a_422(api: Api, depth: int) -> None:
    outcome = {"decision_id": "dec_x", "order_id": "o", "status": "success", "occurred_at": "2026-11-01T12:00:00Z"}
    body = json.dumps(outcome).encode()[:-1] + b', "x": ' + b"[" * depth + b"]" * depth + b"}"
    answer = api.post_raw("/v1/outcomes", body, FAST)
    assert answer.status_code == 422, answer.text
    assert [detail["field"] for detail in answer.json()["detail"]] == ["body"]


def test_an_unexpected_error_is_a_json_500_that_closes_the_connection(api: Api) -> None:

    def broken(*_args: object) -> str:
        raise RuntimeError("a bug")

    api.runtime.decide_json = broken  # type: ignore[method-assign]
    api.runtime.decide = broken  # type: ignore[method-assign]  # the fast path hands over to the route
    transport = httpx.ASGITransport(app=serving_app(api.app), raise_app_exceptions=False)
    client = httpx.AsyncClient(transport=transport, base_url="http://api")
    answer = api.loop.run_until_complete(client.post("/v1/decisions", content=_body(), headers=FAST))
    api.loop.run_until_complete(client.aclose())
    assert answer.status_code == 500
    assert answer.json() == {"detail": "internal error; the request was not decided"}
    # uvicorn drops the connection after an unhandled error: a pooling client must not reuse it.
    assert answer.headers["connection"] == "close"


@pytest.mark.parametrize(
    ("extra", "status", "field"),
    [
        (b',"x":18446744073709551616', 200, None),  # an integer beyond 64 bits is valid JSON: stored as sent
        (b',"x":"\\ud800"', 422, "x"),
        (b',"order_id":"   "', 422, "order_id"),
        (b',"decision_id":"  "', 422, "decision_id"),
        (b',"occurred_at":"1793528100"', 422, "occurred_at"),
    ],
)
def test_outcome_input_that_used_to_be_a_500_or_stored_blank(
    api: Api, extra: bytes, status: int, field: str | None
) -> None:
    outcome = {"decision_id": "dec_x", "order_id": "o", "status": "success", "occurred_at": "2026-11-01T12:00:00Z"}
    answer = api.post_raw("/v1/outcomes", json.dumps(outcome).encode()[:-1] + extra + b"}", FAST)
    assert answer.status_code == status, answer.text
    if field is not None:
        assert [detail["field"] for detail in answer.json()["detail"]] == [field]


@pytest.mark.parametrize("path", ["/v1/decisions", "/v1/decisions:batch", "/v1/outcomes"])
def test_a_body_declared_larger_than_the_limit_is_refused_before_it_is_read(api: Api, path: str) -> None:
    headers = FAST | {"Content-Length": str(MAX_REQUEST_BODY + 1)}
    scope = {"type": "http", "method": "POST", "path": path,
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}  # fmt: skip
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        raise AssertionError("the body must not be read")

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    api.loop.run_until_complete(serving_app(api.app)(scope, receive, send))
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"]) == {"detail": f"request body larger than {MAX_REQUEST_BODY} bytes"}  # type: ignore[arg-type]


def _chunked(body: bytes, chunk: int, sent: list[int]) -> AsyncIterator[bytes]:
    """``body`` as a stream without Content-Length (httpx sends it chunked), counting the bytes handed out."""

    async def stream() -> AsyncIterator[bytes]:
        for offset in range(0, len(body), chunk):
            sent.append(len(body[offset : offset + chunk]))
            yield body[offset : offset + chunk]

    return stream()


@pytest.mark.parametrize("path", ["/v1/decisions", "/v1/decisions:batch", "/v1/outcomes"])
def test_a_chunked_body_past_the_limit_is_refused_once_the_limit_is_passed(api: Api, path: str) -> None:
    # Without Content-Length nothing announced the size: the body used to be read whole, however large.
    chunk = 4 * 1024 * 1024
    sent: list[int] = []
    oversized = b"[" + b" " * (MAX_REQUEST_BODY + 2 * chunk) + b"]"
    answer = api.loop.run_until_complete(api.client.post(path, content=_chunked(oversized, chunk, sent), headers=FAST))
    assert answer.status_code == 413
    assert answer.json() == {"detail": f"request body larger than {MAX_REQUEST_BODY} bytes"}
    assert answer.headers["connection"] == "close"
    assert sum(sent) <= MAX_REQUEST_BODY + chunk  # reading stopped at the first chunk past the limit


def test_a_chunked_request_within_the_limit_is_answered_as_if_it_had_a_content_length(api: Api) -> None:
    body = _body()
    chunked = api.loop.run_until_complete(
        api.client.post("/v1/decisions", content=_chunked(body, 100, []), headers=FAST)
    )
    assert chunked.status_code == 200, chunked.text
    plain = api.post_raw("/v1/decisions", body, FAST)
    assert chunked.json().keys() == plain.json().keys()
    assert chunked.json()["action"] == plain.json()["action"]
    negative = _body().replace(b'"amount":', b'"amount":-')
    bad = api.loop.run_until_complete(
        api.client.post("/v1/decisions", content=_chunked(negative, 100, []), headers=FAST)
    )
    assert bad.status_code == 422
    assert [detail["field"] for detail in bad.json()["detail"]] == ["amount"]


def _deflated(data: bytes) -> bytes:
    return zlib.compress(data)


@pytest.mark.parametrize(("coding", "encode"), [("gzip", gzip.compress), ("deflate", _deflated)])
def test_a_compressed_body_is_decoded_and_answered_as_the_plain_one(
    api: Api, coding: str, encode: Callable[[bytes], bytes]
) -> None:
    # Compressed bodies used to get FastAPI's bare 400 "There was an error parsing the body".
    plain = api.post_raw("/v1/decisions", _body(), FAST)
    compressed = api.post_raw("/v1/decisions", encode(_body()), FAST | {"Content-Encoding": coding})
    assert compressed.status_code == plain.status_code == 200, compressed.text
    assert {k: v for k, v in compressed.json().items() if k != "decision_id"} == {
        k: v for k, v in plain.json().items() if k != "decision_id"
    }
    batch = json.dumps([request_body(), request_body()]).encode()
    answer = api.post_raw("/v1/decisions:batch", encode(batch), FAST | {"Content-Encoding": coding.upper()})
    assert answer.status_code == 200, answer.text
    assert len(answer.json()) == 2
    wrong = api.post_raw("/v1/outcomes", encode(b'{"order_id": "o"}'), FAST | {"Content-Encoding": coding})
    assert wrong.status_code == 422  # decoded, then validated as any body
    assert "decision_id" in {detail["field"] for detail in wrong.json()["detail"]}


@pytest.mark.parametrize(
    ("coding", "content", "status", "detail"),
    [
        ("br", b"\x0b\x02\x80{}\x03", 415, "Content-Encoding 'br' is not supported"),
        ("gzip, br", b"{}", 415, "Content-Encoding 'br' is not supported"),
        ("gzip", b'{"not": "gzip"}', 400, "request body is not valid gzip data"),
        ("gzip", gzip.compress(b"{}" * 1000, mtime=0)[:-12], 400, "request body is not one complete gzip stream"),
        ("deflate", b"\x00\x01", 400, "request body is not valid deflate data"),
        ("gzip", gzip.compress(b" " * (MAX_REQUEST_BODY + 1), mtime=0), 413, "once decoded (gzip)"),
    ],
    # Fixed ids and mtime=0: gzip stamps the time into its header, and xdist workers collecting in different
    # seconds saw different test ids and refused to run.
    ids=["br", "br-after-gzip", "not-gzip", "truncated-gzip", "not-deflate", "gzip-bomb"],
)
def test_a_body_that_cannot_be_decoded_is_refused_naming_why(
    api: Api, coding: str, content: bytes, status: int, detail: str
) -> None:
    for path in ("/v1/decisions", "/v1/outcomes"):
        answer = api.post_raw(path, content, FAST | {"Content-Encoding": coding})
        assert answer.status_code == status, answer.text
        assert detail in answer.json()["detail"]


@pytest.mark.parametrize("path", ["/v1/decisions", "/v1/decisions:batch", "/v1/outcomes"])
def test_two_authorization_headers_are_refused_on_every_route(api: Api, path: str) -> None:
    # The fast path used to take the last header and the documented routes the first: "Bearer wrong" plus a valid
    # key passed on one route and not on another, and two merchants' keys let either merchant's body through.
    body = {"/v1/decisions": _body(), "/v1/decisions:batch": b"[" + _body() + b"]"}.get(path, b"{}")
    for pair in ((DEMO_KEY, "wrong"), ("wrong", DEMO_KEY), (DEMO_KEY, DEMO_KEY)):
        headers = [("Content-Type", "application/json"), *(("Authorization", f"Bearer {key}") for key in pair)]
        answer = api.loop.run_until_complete(api.client.post(path, content=body, headers=headers))
        assert answer.status_code == 401, (pair, answer.text)
        assert answer.json()["detail"] == "more than one Authorization header: send exactly one"


def test_a_gzip_body_of_several_members_and_a_bodiless_get_with_an_encoding_are_answered(api: Api) -> None:
    # RFC 1952 allows members one after another (what `cat a.gz b.gz` makes); both used to be a 400.
    body = _body()
    members = gzip.compress(body[:50]) + gzip.compress(body[50:])
    answer = api.post_raw("/v1/decisions", members, FAST | {"Content-Encoding": "gzip"})
    assert answer.status_code == 200, answer.text
    health = api.loop.run_until_complete(api.client.get("/healthz", headers={"Content-Encoding": "gzip"}))
    assert health.status_code == 200
    trailing = api.post_raw("/v1/decisions", zlib.compress(body) + b"junk", FAST | {"Content-Encoding": "deflate"})
    assert trailing.status_code == 400
    assert "data after its deflate stream" in trailing.json()["detail"]

"""One memo of the catalog's normalisation (`model.catalog.MemoCatalog`) serves the API, the executor and a model
bundle's features: it answers as the catalog, remembers an input once, stays bounded, and keeps no huge input."""

from __future__ import annotations

from pathlib import Path

from model.catalog import MEMO_MAX_CHARS, REQUEST_CATALOG_MEMO_SIZE, MemoCatalog, load_catalog
from service.api import app as app_module
from tests.unit.test_api import settings_for

_INSUFFICIENT = ("stripe", "card_declined", "Your card has insufficient funds.", "51", None, None, "visa", "card")
_DO_NOT_HONOUR = ("adyen", "Refused", "Do not honor", "05", None, None, "mastercard", "card")
_TIMEOUT = ("razorpay", "GATEWAY_ERROR", "Bank timed out", None, None, None, None, "upi")


def test_the_memo_answers_as_the_catalog_and_keeps_one_answer_per_input() -> None:
    catalog = load_catalog()
    memo = MemoCatalog(catalog, maxsize=8)

    first = memo.normalise(*_INSUFFICIENT)

    assert first == catalog.normalise(*_INSUFFICIENT)
    assert memo.normalise(*_INSUFFICIENT) is first  # remembered, not worked out again
    assert memo.visa_category("05") == catalog.visa_category("05")  # the rest of the catalog answers as it does
    assert memo.version == catalog.version


def test_the_memo_is_emptied_when_full_and_keeps_no_input_longer_than_the_limit() -> None:
    memo = MemoCatalog(load_catalog(), maxsize=2)
    first = memo.normalise(*_INSUFFICIENT)
    memo.normalise(*_DO_NOT_HONOUR)
    memo.normalise(*_TIMEOUT)  # a third input: the memo is emptied first

    assert memo.normalise(*_INSUFFICIENT) is not first

    long_message = ("stripe", "card_declined", "x" * (MEMO_MAX_CHARS + 1), None, None, None, "visa", "card")
    answer = memo.normalise(*long_message)
    assert memo.normalise(*long_message) is not answer
    assert memo.normalise(*long_message) == answer


def test_the_api_decides_through_the_memo(tmp_path: Path) -> None:
    runtime = app_module.build_runtime(settings_for(tmp_path))

    assert type(runtime.catalog) is MemoCatalog
    assert runtime.catalog._maxsize == REQUEST_CATALOG_MEMO_SIZE

"""One memo of the catalog's normalisation (`model.catalog.MemoCatalog`) serves the API, the executor and a model
bundle's features: it answers as the catalog, remembers an input once, stays bounded, and keeps no huge input."""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from model.bundle import ModelBundle
from model.catalog import (
    MEMO_MAX_CHARS,
    REQUEST_CATALOG_MEMO_SIZE,
    MemoCatalog,
    catalog_mismatch,
    load_catalog,
    normalise_request,
)
from model.gsm import with_overlay, write_overlay
from model.rules import Candidate
from model.training import train
from model.vocab import Action, ErrorClass, Strategy
from service.api import app as app_module
from service.api.model_holder import VersionedScorer
from service.executor.worker import make_decider
from tests.factories import GSM_ONLY_CODE, make_history_frames, make_request
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


def test_the_memo_answers_as_the_catalog_whatever_it_is_given() -> None:
    """The catalog answers any input and never raises (a history frame holds NaN, numbers): so does its memo, and
    the memo's inherited ``normalise_frame``, which hands it a frame's cells as they are."""
    catalog = load_catalog()
    memo = MemoCatalog(catalog, maxsize=8)

    for odd in [("stripe", 51), ("stripe", math.nan), ("stripe", ["card_declined"]), ("adyen", None, None, 5.0)]:
        assert memo.normalise(*odd) == catalog.normalise(*odd), odd  # type: ignore[arg-type]
    frame = pd.DataFrame(
        {
            "connector": ["stripe", "adyen", "stripe"],
            "error_code": ["card_declined", None, math.nan],
            "network_decline_code": [math.nan, "05", 51],
        }
    )
    pd.testing.assert_frame_equal(memo.normalise_frame(frame), catalog.normalise_frame(frame))


def test_the_api_decides_through_the_memo(tmp_path: Path) -> None:
    runtime = app_module.build_runtime(settings_for(tmp_path))

    assert type(runtime.catalog) is MemoCatalog
    assert runtime.catalog._maxsize == REQUEST_CATALOG_MEMO_SIZE


class _OneBundle:
    """A registry whose champion is version 1, a trained bundle."""

    def __init__(self, bundle: ModelBundle) -> None:
        self.bundle = bundle

    def champion_version(self) -> str:
        return "1"

    def load(self, version: str) -> VersionedScorer:
        return VersionedScorer(self.bundle, version)


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    """A small trained bundle (each test sets the catalog it reads first)."""
    attempts, nudges = make_history_frames(300, seed=5)
    return train(attempts, nudges, seed=0, max_rounds=10, evaluate_unseen_codes=False).bundle


def test_a_served_bundle_reads_the_overlaid_catalog_the_rules_read(tmp_path: Path, bundle: ModelBundle) -> None:
    """With a gateway status map overlay, a code only the overlay defines is known to the model's features as it is
    to the rules: the served bundle reads the API's catalog, set when the holder loads it."""
    overlay = write_overlay([GSM_ONLY_CODE], tmp_path / "overlay.csv")
    runtime = app_module.build_runtime(settings_for(tmp_path, gsm_overlay=overlay))
    bundle.use_catalog(load_catalog())
    runtime.holder.source = _OneBundle(bundle)
    request = make_request(failure={"error_code": "gsm_only_code"})

    assert runtime.holder.refresh()
    served = runtime.holder.current.scorer
    assert served is not None
    rules_read = normalise_request(runtime.catalog, request)
    context = served.context(request)

    assert rules_read.known_code
    assert rules_read.error_class == ErrorClass.PROCESSOR_TECHNICAL
    assert not normalise_request(load_catalog(), request).known_code  # the shipped catalog alone lacks the code
    assert (context["known_code"], context["error_class"]) == (1.0, rules_read.error_class.value)


def test_a_bundle_given_another_catalog_builds_its_rows_again(bundle: ModelBundle) -> None:
    """The matrix a bundle remembers for its last request was built with the catalog before: another catalog
    (``use_catalog``) must not be answered with it."""
    request = make_request(failure={"error_code": "gsm_only_code"})
    candidates = [
        Candidate(
            Action.RETRY, request.event_time + timedelta(hours=1), strategy=Strategy.RETRY_SAME, connector="adyen"
        )
    ]
    bundle.use_catalog(load_catalog())
    shipped_rows = bundle.matrix(request, candidates)

    bundle.use_catalog(with_overlay(load_catalog(), [GSM_ONLY_CODE]))
    overlaid_rows = bundle.matrix(request, candidates)

    rebuilt = bundle.spec.transform_request(bundle.context(request), candidates)
    assert np.array_equal(overlaid_rows, rebuilt, equal_nan=True)
    assert not np.array_equal(overlaid_rows, shipped_rows, equal_nan=True)


def test_an_overlay_on_the_memo_is_what_the_overlaid_catalog_reads() -> None:
    """A memo answers from the catalog it wraps (and what it remembered of it): an overlay of the memo overlays that
    catalog, and remembers afresh, rather than claim the overlay's version and answer as before."""
    memo = MemoCatalog(load_catalog(), maxsize=8)
    before = memo.normalise("stripe", "gsm_only_code")  # remembered before the overlay

    overlaid = with_overlay(memo, [GSM_ONLY_CODE])

    expected = with_overlay(load_catalog(), [GSM_ONLY_CODE])
    assert overlaid.normalise("stripe", "gsm_only_code") == expected.normalise("stripe", "gsm_only_code")
    assert overlaid.version == expected.version
    assert type(overlaid) is MemoCatalog
    assert overlaid._maxsize == 8
    assert memo.normalise("stripe", "gsm_only_code") == before  # the memo itself is untouched
    assert not before.known_code


def test_the_executors_model_reads_the_catalog_its_rules_read() -> None:
    """`winback executor run` decides with its catalog; the models its holder loads read that one too."""
    catalog = with_overlay(load_catalog(), [GSM_ONLY_CODE])
    _, stop = make_decider(catalog, None)
    try:
        holder = stop.__self__  # make_decider hands back its holder's stop
        assert holder.catalog is catalog
    finally:
        stop()


def test_a_trained_bundle_says_when_it_serves_with_another_catalog(bundle: ModelBundle) -> None:
    """What the holder compares at load: a registered bundle's ``catalog_version`` (through the registry's wrapper)
    against the catalog it is served with."""
    served = VersionedScorer(bundle, "1")
    overlaid = with_overlay(load_catalog(), [GSM_ONLY_CODE])

    assert catalog_mismatch(served, load_catalog()) is None
    assert catalog_mismatch(served, None) is None  # no catalog given: the shipped one serves
    assert catalog_mismatch(served, overlaid) == (
        f"trained with error catalog {load_catalog().version}, serving with error catalog {overlaid.version}"
    )

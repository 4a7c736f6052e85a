"""The text model's direct form (``_DirectText``): scikit-learn's floats, bit for bit, without its per-call cost."""

from __future__ import annotations

import dataclasses
import logging
import pickle
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model import textmodel
from model.features import TEXT_CLASSES, TEXT_COLUMNS
from model.personal_data import mask_addresses_in
from model.textmodel import DIRECT_ROWS, ErrorTexts, TextModel, _DirectText, document

MESSAGES = [
    "Your card was declined.",
    "Insufficient funds in the account",
    "Do not honor",
    "The card has expired; ask for another one",
    "Suspected fraud: transaction blocked by the issuer",
    "Issuer unavailable, try again later",
    "Authentication required (3DS)",
    "Limit exceeded for this card",
]


def _table(classes: list[str | None], retry: bool = True) -> ErrorTexts:
    n = len(classes)
    return ErrorTexts(
        connectors=[("stripe", "adyen", "razorpay")[i % 3] for i in range(n)],
        codes=[f"ERR_{i}_{MESSAGES[i % len(MESSAGES)].split()[0].upper()}" for i in range(n)],
        messages=[f"{MESSAGES[i % len(MESSAGES)]} ({i})" for i in range(n)],
        retry_successes=np.array([float(i % 3) if retry else 0.0 for i in range(n)]),
        retry_trials=np.array([3.0] * n),
        classes=classes,
    )


@pytest.fixture(scope="module")
def model() -> TextModel:
    return TextModel.fit(_table([TEXT_CLASSES[i % len(TEXT_CLASSES)] for i in range(60)]))


def _sklearn_columns(model: TextModel, docs: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    assert model.vectorizer is not None
    assert model.retry_model is not None
    matrix = model.vectorizer.transform(docs)
    classes = None if model.class_model is None else model.class_model.predict_proba(matrix)
    return model.retry_model.predict_proba(matrix)[:, 1], classes


texts = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=80)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(errors=st.lists(st.tuples(st.sampled_from(["stripe", "adyen", None]), texts, texts), min_size=1, max_size=9))
def test_the_direct_form_gives_scikit_learns_floats_bit_for_bit(
    model: TextModel, errors: list[tuple[str | None, str, str]]
) -> None:
    direct = model._direct_form()
    assert isinstance(direct, _DirectText)
    docs = [document(*error) for error in errors]
    p_retry, classes = direct.predict(docs)
    expected_retry, expected_classes = _sklearn_columns(model, docs)
    assert p_retry is not None
    assert classes is not None
    assert expected_classes is not None
    np.testing.assert_array_equal(p_retry, expected_retry)
    np.testing.assert_array_equal(classes, expected_classes)


def test_predict_is_the_same_below_and_above_the_direct_rows(model: TextModel) -> None:
    """Serving (a few errors: direct) and training (thousands: scikit-learn) give each error the same features."""
    errors = [("stripe", f"NEW_{i}", f"{MESSAGES[i % len(MESSAGES)]}, seen {i} times") for i in range(DIRECT_ROWS + 5)]
    columns = [list(column) for column in zip(*errors, strict=True)]
    together = model.predict(*columns)  # above DIRECT_ROWS: scikit-learn
    for i, error in enumerate(errors):
        alone = model.features_for(*error)  # one row: direct
        assert alone == {name: float(together[name][i]) for name in TEXT_COLUMNS}


def test_an_error_with_no_known_n_gram_scores_the_intercepts(model: TextModel) -> None:
    docs = [document(None, None, None), document(None, "ŧ", "ŋ ŧ")]
    direct = model._direct_form()
    assert isinstance(direct, _DirectText)
    assert direct.same_as_sklearn(model, docs)


@pytest.mark.parametrize(
    ("classes", "retry"),
    [
        (["hard_decline", "insufficient_funds"] * 20, True),  # a class model of two classes: scikit-learn's binary form
        ([None] * 40, True),  # no class model
        ([TEXT_CLASSES[i % 4] for i in range(40)], False),  # no retry model (no retry ever succeeded)
    ],
)
def test_every_shape_of_text_model_has_its_direct_form(classes: list[str | None], retry: bool) -> None:
    fitted = TextModel.fit(_table(classes, retry=retry))
    assert (fitted.class_model is not None) == any(classes)
    assert (fitted.retry_model is not None) == retry
    direct = fitted._direct_form()
    assert isinstance(direct, _DirectText)
    errors = [("stripe", "ERR_X", "Your card was declined twice"), ("adyen", None, "limit")]
    direct_out = fitted.predict(*[list(column) for column in zip(*errors, strict=True)])
    through_sklearn = dataclasses.replace(fitted, _cache={})
    through_sklearn._direct = False  # no direct form: scikit-learn computes
    assert through_sklearn._direct_form() is None
    expected = through_sklearn.predict(*[list(column) for column in zip(*errors, strict=True)])
    for name in TEXT_COLUMNS:
        np.testing.assert_array_equal(direct_out[name], expected[name], err_msg=name)


def test_settings_it_does_not_reproduce_leave_the_work_to_scikit_learn(model: TextModel) -> None:
    other = pickle.loads(pickle.dumps(model))
    assert other.vectorizer is not None
    other.vectorizer.set_params(sublinear_tf=False)
    assert _DirectText.of(other) is None
    assert other._direct_form() is None
    assert other.predict(["stripe"], ["X"], ["declined"])["text_p_retry"].shape == (1,)


def test_a_direct_form_that_differs_from_scikit_learn_is_not_used(
    model: TextModel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_DirectText, "same_as_sklearn", lambda self, model, docs: False)
    with caplog.at_level(logging.WARNING, logger="winback.model"):
        assert _DirectText.of(model) is None
    assert "differs from scikit-learn's" in caplog.text


def test_the_direct_form_and_its_word_cache_are_not_pickled(model: TextModel) -> None:
    model.features_for("stripe", "SOME_CODE", "some words")
    assert isinstance(model._direct, _DirectText)
    assert model._direct.words
    copy = pickle.loads(pickle.dumps(model))
    assert copy._direct is None
    assert copy._cache == {}
    # A pickle written before the field existed (its state without it) loads with none, and builds it on first use.
    state = dict(copy.__dict__)
    del state["_direct"]
    old = pickle.loads(pickle.dumps(_Stateless(state)))._model()
    assert "_direct" not in old.__dict__
    assert old._direct is None
    assert old.features_for("stripe", "SOME_CODE", "some words") == model.features_for(
        "stripe", "SOME_CODE", "some words"
    )


class _Stateless:
    """Pickles as a TextModel whose state lacks some fields (what an older release wrote)."""

    def __init__(self, state: dict[str, object]) -> None:
        self.state = state

    def _model(self) -> TextModel:
        model = TextModel.__new__(TextModel)
        model.__dict__.update(self.state)
        return model


def test_a_copy_with_other_regressions_builds_its_own_direct_form(model: TextModel) -> None:
    model.features_for("stripe", "A_CODE", "declined")
    without_retry = dataclasses.replace(model, _cache={}, retry_model=None)
    assert without_retry._direct is None
    assert without_retry.features_for("stripe", "A_CODE", "declined")["text_p_retry"] == model.retry_prior


def test_the_word_cache_is_bounded_by_the_columns_it_holds(model: TextModel, monkeypatch: pytest.MonkeyPatch) -> None:
    import model.textmodel as textmodel

    direct = TextModel.fit(_table([TEXT_CLASSES[i % len(TEXT_CLASSES)] for i in range(60)]))._direct_form()
    assert isinstance(direct, _DirectText)
    monkeypatch.setattr(textmodel, "WORD_CACHE_COLUMNS", 200)
    for index in range(50):
        direct.predict([document("stripe", None, f"declined{index} card{index} limit{index}")])
        assert direct.word_columns <= 200
        assert direct.word_columns == sum(len(columns) for columns in direct.words.values())
    assert direct.words  # filled again after each clearing
    long_word = "x" * (textmodel.CACHED_WORD_CHARS + 1)
    direct.predict([document("stripe", None, long_word)])
    assert long_word not in direct.words  # a long word is looked up, not kept


def test_the_direct_form_keeps_the_gil_through_an_error(model: TextModel) -> None:
    """A second thread runs only when this one lets the GIL go by itself (the switch interval is made huge): the
    direct form's numpy calls must not, or a loading thread making them starves a request waiting for the GIL."""
    import sys
    import threading

    direct = model._direct_form()
    assert isinstance(direct, _DirectText)
    long_message = " ".join(f"declined{i} card{i} limit{i} issuer{i}" for i in range(40))[:1000]
    docs = [document("stripe", "card_declined", "Your card was declined."), document("adyen", "X", long_message)]
    direct.predict(docs)  # words cached, as on the second sight of them
    ran = {"count": 0}
    done = threading.Event()

    def other() -> None:
        while not done.is_set():
            ran["count"] += 1
            time.sleep(0)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(100.0)
    try:
        thread = threading.Thread(target=other, daemon=True)
        thread.start()
        time.sleep(0.05)  # the thread runs while this one sleeps, then waits for the GIL
        before = ran["count"]
        for _ in range(200):
            direct.predict(docs)
        after = ran["count"]
    finally:
        done.set()
        sys.setswitchinterval(interval)
    thread.join(5)
    assert after == before


def test_the_features_of_a_huge_error_are_given_but_not_cached(model: TextModel) -> None:
    """The serving cache is bounded by entries: 4,096 distinct 64 KB errors held 256 MB."""
    huge = ("stripe", "C" * 32_000, "m" * 32_000)
    predicted = model.predict([huge[0]], [huge[1]], [huge[2]])
    assert model.features_for(*huge) == {name: float(values[0]) for name, values in predicted.items()}
    assert huge not in model.cached_errors()
    small = ("stripe", "do_not_honor", "Do not honor")
    model.features_for(*small)
    assert small in model.cached_errors()


def test_a_requests_decline_text_is_masked_once_per_distinct_error(
    model: TextModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The text model masks the e-mail addresses and phone numbers of the decline texts it reads
    (``model.textmodel.document``), and a request reads an error's features from its cache: the masking runs when an
    error is first seen, not on every request carrying it."""
    masked: list[str] = []

    def counting(text: str) -> str:
        masked.append(text)
        return mask_addresses_in(text)

    model._direct_form()  # built first: its check against scikit-learn reads sample errors of its own
    monkeypatch.setattr(textmodel, "mask_addresses_in", counting, raising=False)  # (before: not there)
    quoting = ("stripe", "card_declined", "card holder jane.doe@example.com declined, OTP to +91 98765 43210 failed")
    first = model.features_for(*quoting)
    assert masked == [quoting[2]]
    assert [model.features_for(*quoting) for _ in range(3)] == [first] * 3
    assert masked == [quoting[2]]
    assert (
        model.features_for(
            "stripe", "card_declined", "card holder j***@example.com declined, OTP to +91********3210 failed"
        )
        == first
    )  # as the history files hold it: the same text


def test_a_message_of_megabytes_is_masked_only_within_what_the_model_reads() -> None:
    # Masked whole, a 30 MB message (too long to cache: masked again on every request) cost seconds per decision.
    from model import textmodel

    calls: list[int] = []
    real = textmodel.mask_addresses_in

    def counting(text: str) -> str:
        calls.append(len(text))
        return real(text)

    textmodel.mask_addresses_in = counting
    try:
        text = textmodel.document("stripe", "card_declined", "holder jane.doe@example.com " + "x" * 30_000_000)
    finally:
        textmodel.mask_addresses_in = real
    assert calls == [textmodel.MASK_WINDOW_CHARS]
    assert "j***@example.com" in text
    assert "jane.doe" not in text

"""Feature building: training and serving build identical rows; never-seen values map to "other"."""

from __future__ import annotations

import math
from collections import Counter
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.catalog import load_catalog
from model.features import (
    CATEGORICAL_FEATURES,
    NUMERIC_FEATURES,
    OTHER_CODE,
    RAW_COLUMNS,
    RETIRED_FEATURES,
    TEXT_COLUMNS,
    FeatureSpec,
    context_from_request,
    derive,
    expand_candidates,
)
from model.personal_data import mask_addresses_in
from model.rules import Candidate, build_context, enumerate_candidates, next_payday, payday_zones
from model.textmodel import MAX_PART_CHARS, TextModel, code_words, document
from model.training import _error_texts, decision_points, raw_columns, request_at
from model.vocab import Action, Channel, Strategy
from tests.factories import make_history_frames, make_merchant, make_request

FX = {"USD": 1.0, "INR": 0.012}


def _retry(at: datetime, strategy: Strategy = Strategy.RETRY_SAME, connector: str = "stripe") -> Candidate:
    return Candidate(Action.RETRY, at, strategy=strategy, connector=connector)


def test_history_and_request_build_identical_feature_rows() -> None:
    attempts, nudges = make_history_frames(400, seed=3)
    points = decision_points(attempts, nudges)
    catalog = load_catalog()
    cols = raw_columns(points, catalog)
    labels = points["label"].to_numpy(dtype=bool)
    texts, _ = _error_texts(cols, labels, np.arange(len(points)))
    text_model = TextModel.fit(texts, seed=0)
    predicted = text_model.predict(list(cols["connector"]), list(cols["error_code"]), list(cols["error_message"]))
    for name in TEXT_COLUMNS:
        cols[name] = predicted[name]
    spec = FeatureSpec.fit(cols, min_count=5)
    trained = spec.transform(cols)

    # Every kind of situation: retries, nudges, and points whose history already holds nudges and retries.
    chosen = {
        "retry": np.flatnonzero(points["kind"] == "retry")[:5],
        "retarget": np.flatnonzero(points["kind"] == "retarget")[:5],
        "after_nudge": np.flatnonzero(points["nudge_prefix"] > 0)[:5],
        "after_retry": np.flatnonzero(points["n_silent_retries"] > 0)[:5],
    }
    assert all(len(rows) > 0 for rows in chosen.values()), chosen
    for rows in chosen.values():
        for i in rows:
            request, candidate = request_at(attempts, nudges, {str(k): v for k, v in points.iloc[i].items()})
            context = context_from_request(request, catalog)
            failure = request.failure
            context.update(text_model.features_for(failure.connector, failure.error_code, failure.error_message))
            served = spec.transform(expand_candidates(context, [candidate]))
            np.testing.assert_array_equal(served[0], trained[i], err_msg=f"decision point {i}")


def test_a_decline_text_with_an_address_gives_the_same_text_features_from_the_history_and_from_a_request() -> None:
    """The history files hold decline texts masked (``winback history export``), a request's failure carries the
    connector's text as sent: the text model masks what it reads, so a decline text quoting the customer's e-mail
    address and phone number gives the same text features in training (the exported history) and serving (the raw
    request). Before, serving read ``jane.doe...`` where training had read ``j***@...``."""
    raw, nudges = make_history_frames(400, seed=3)
    failures = np.flatnonzero((raw["status"] == "failure").to_numpy(dtype=bool))[::3]
    quoting = [f"card holder jane.doe{i}@example.com declined, OTP sent to +91 98765 4{i:04d} failed" for i in failures]
    raw.loc[raw.index[failures], "error_message"] = quoting
    exported = raw.copy()  # as the history export writes it
    exported["error_message"] = exported["error_message"].map(mask_addresses_in, na_action="ignore")
    points = decision_points(exported, nudges)
    catalog = load_catalog()
    cols = raw_columns(points, catalog)
    texts, _ = _error_texts(cols, points["label"].to_numpy(dtype=bool), np.arange(len(points)))
    text_model = TextModel.fit(texts, seed=0)
    trained = text_model.predict(list(cols["connector"]), list(cols["error_code"]), list(cols["error_message"]))

    rows = [i for i, message in enumerate(cols["error_message"]) if isinstance(message, str) and "***@" in message]
    assert len(rows) >= 10
    for i in rows[:10]:
        request, _ = request_at(raw, nudges, {str(k): v for k, v in points.iloc[i].items()})
        failure = request.failure
        assert failure.error_message is not None
        assert "jane.doe" in failure.error_message  # served as sent
        served = text_model.features_for(failure.connector, failure.error_code, failure.error_message)
        assert served == {name: float(trained[name][i]) for name in TEXT_COLUMNS}, f"decision point {i}"


def test_never_seen_categorical_values_map_to_other() -> None:
    request = make_request(
        currency="XYZ",
        customer={"country": "ZZ"},
        payment={"payment_method": "crypto_wallet", "card_network": "newnet", "issuer": "Nobody Bank"},
        failure={"connector": "brand_new_psp", "error_code": "NEVER_SEEN_42", "error_message": "zorp"},
    )
    spec = FeatureSpec(
        numeric=["amount_usd"],
        vocabularies={"connector": ["adyen", "stripe"], "payment_method": ["card"], "currency": ["INR"]},
        fx_to_usd=FX,
    )
    at = request.event_time + timedelta(hours=1)
    context = context_from_request(request, load_catalog())
    matrix = spec.transform(expand_candidates(context, [_retry(at, connector="brand_new_psp")]))
    assert matrix.dtype == np.float32
    assert matrix.shape == (1, 4)
    assert math.isnan(matrix[0, 0])  # unknown currency: amount in USD unknown, not a guess
    assert matrix[0, 1:].tolist() == [OTHER_CODE] * 3
    assert spec.decode("connector", OTHER_CODE) == "other"
    assert spec.decode("connector", 2.0) == "stripe"


def test_rare_values_share_the_other_code_and_missing_is_a_category() -> None:
    request = make_request()
    at = request.event_time
    context = context_from_request(request, load_catalog())
    frame = expand_candidates(context, [_retry(at, connector=c) for c in ["adyen"] * 3 + ["stripe"] * 2])
    frame["issuer"] = np.array(["A", "A", "A", None, None], dtype=object)
    spec = FeatureSpec.fit(frame, min_count=3, fx_to_usd=FX)
    assert spec.vocabularies["target_connector"] == ["adyen"]
    assert "__missing__" not in spec.vocabularies["issuer"]
    codes = spec.encode("target_connector", frame["target_connector"])
    assert codes.tolist() == [1.0, 1.0, 1.0, OTHER_CODE, OTHER_CODE]
    both = FeatureSpec.fit(frame, min_count=2, fx_to_usd=FX)
    assert both.encode("issuer", np.array([None, "A", "B"], dtype=object)).tolist() == [2.0, 1.0, OTHER_CODE]


def test_time_features_use_the_customers_local_time_and_payday() -> None:
    # 2026-11-28 20:00 UTC is 2026-11-29 01:30 in India: a Sunday, 52.5 hours before payday (the 1st, 06:00 IST).
    request = make_request(event_time="2026-11-28T20:00:00Z", customer={"country": "IN"})
    context = context_from_request(request, load_catalog())
    later = datetime(2026, 12, 1, 6, 0, tzinfo=UTC)  # 11:30 IST on the 1st
    soon = datetime(2026, 11, 28, 21, 0, tzinfo=UTC)
    derived = derive(expand_candidates(context, [_retry(soon), _retry(later)]), FX)
    assert derived["local_hour"].tolist() == [1.0, 1.0]
    assert derived["local_weekday"].tolist() == [6.0, 6.0]
    assert derived["local_day"].tolist() == [29.0, 29.0]
    assert derived["days_to_next_payday"].tolist() == [52.5 / 24, 52.5 / 24]
    assert derived["is_month_end"].tolist() == [1.0, 1.0]
    assert derived["exec_local_hour"].tolist() == [2.0, 11.0]
    assert derived["exec_day"].tolist() == [29.0, 1.0]
    # From 21:00 UTC, 51.5 hours to payday; from 11:30 IST on the 1st, the next is the 26th at 06:00 IST.
    assert derived["exec_days_to_next_payday"].tolist() == [51.5 / 24, (24 * 24 + 18.5) / 24]
    assert derived["next_payday_before_exec"].tolist() == [0.0, 1.0]
    assert derived["delay_hours"].tolist() == pytest.approx([1.0, 58.0])
    assert derived["amount_usd"].tolist() == pytest.approx([499.0 * 0.012] * 2)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    minutes=st.integers(0, 3 * 366 * 24 * 60),
    country=st.sampled_from(["IN", "US", "AU", "NZ", "BR", "ZZ", None]),
    delay_hours=st.sampled_from([0.0, 1.0, 6.0, 72.0, 240.0]),
)
def test_the_payday_features_are_the_rules_paydays(minutes: int, country: str | None, delay_hours: float) -> None:
    # Both paths (history and request) read model.rules.next_payday in the customer's zones, at the event and at
    # the action's time: random moments over three years (month ends, February, DST changes).
    event = datetime(2025, 1, 1, tzinfo=UTC) + timedelta(minutes=minutes)
    later = event + timedelta(hours=delay_hours)
    request = make_request(event_time=event.isoformat(), customer={"country": country})
    context = context_from_request(request, load_catalog())
    context.update(dict.fromkeys(TEXT_COLUMNS, 0.5))
    derived = derive(expand_candidates(context, [_retry(later)]), FX)
    zones = payday_zones(country, None)
    payday = next_payday(event, zones)
    assert derived["days_to_next_payday"][0] == (payday.timestamp() - event.timestamp()) / 86400.0
    after_later = next_payday(later, zones).timestamp()
    assert derived["exec_days_to_next_payday"][0] == (after_later - later.timestamp()) / 86400.0
    assert derived["next_payday_before_exec"][0] == float(later >= payday)
    served = _SERVING_SPEC.transform_request(context, [_retry(later)])
    expected = _SERVING_SPEC.transform(expand_candidates(context, [_retry(later)]))
    assert served.tobytes() == expected.tobytes()


@pytest.mark.parametrize(
    ("event_time", "country", "merchant_zone"),
    [
        ("2026-11-20T08:00:00Z", "IN", "Asia/Kolkata"),  # the 26th is the next payday: the 1st-only features missed it
        ("2026-11-30T20:00:00Z", "IN", "Asia/Kolkata"),  # 01:30 IST on the 1st: payday is at 06:00, not "today" already
        ("2026-01-31T12:00:00Z", "US", "America/New_York"),  # 06:00 in Los Angeles counts too, as for the rules
        ("2026-03-25T19:30:00Z", "AU", "Australia/Sydney"),  # 06:30 in Sydney, 03:30 in Perth: payday not yet
    ],
)
def test_the_rules_after_payday_retry_is_after_payday_for_the_model(
    event_time: str, country: str, merchant_zone: str
) -> None:
    # The executor's "after payday" retries go at the rules' payday instants; the model must see those retries
    # as after payday, and any earlier one as before it, or it learns another notion of payday than it acts on.
    # (A merchant whose zone lies outside the customer's country may wait longer: see model/features.py.)
    request = make_request(event_time=event_time, customer={"country": country})
    quiet = {"start": "21:00", "end": "09:00", "timezone": merchant_zone}
    merchant = make_merchant(retarget={"retry_window_days": 30, "quiet_hours": quiet})
    rule_context = build_context(request, merchant, load_catalog())
    retries = [c for c in enumerate_candidates(rule_context) if c.action == Action.RETRY]
    rules_payday = next_payday(request.event_time, rule_context.payday_zones)
    assert rules_payday in {c.execute_at for c in retries}
    context = context_from_request(request, load_catalog())
    derived = derive(expand_candidates(context, retries), FX)
    after = [float(c.execute_at >= rules_payday) for c in retries]
    assert derived["next_payday_before_exec"].tolist() == after
    assert 0.0 in after
    assert 1.0 in after
    expected = (rules_payday - request.event_time).total_seconds() / 86400.0
    assert derived["days_to_next_payday"][0] == expected


def test_a_spec_with_the_retired_payday_features_loads_and_an_unknown_feature_is_refused() -> None:
    # A bundle trained when payday was the 1st alone keeps loading (its features are still built); a feature this
    # code does not build at all would reach the model as NaN on the request path, so it is refused.
    old = FeatureSpec(numeric=["delay_hours", "days_to_payday"], vocabularies={"connector": ["stripe"]}, fx_to_usd=FX)
    loaded = FeatureSpec.from_json(old.to_json())
    assert loaded == old
    assert loaded.retired_features == ["days_to_payday"]
    assert FeatureSpec.from_json(_SERVING_SPEC.to_json()).retired_features == []
    unknown = FeatureSpec(numeric=["delay_hours", "shoe_size"], vocabularies={"connector": ["a"]}, fx_to_usd=FX)
    with pytest.raises(ValueError, match=r"does not build: shoe_size \(not a feature of this version\); retrain"):
        FeatureSpec.from_json(unknown.to_json())
    unknown = FeatureSpec(numeric=["delay_hours"], vocabularies={"shoe_size": ["42"]}, fx_to_usd=FX)
    with pytest.raises(ValueError, match=r"does not build: shoe_size \(not a feature of this version\); retrain"):
        FeatureSpec.from_json(unknown.to_json())


def test_unknown_country_falls_back_to_utc_and_dst_is_respected() -> None:
    # New York is UTC-4 in summer, UTC-5 in winter.
    summer = make_request(event_time="2026-07-01T12:00:00Z", customer={"country": "US"}, currency="USD")
    winter = make_request(event_time="2026-01-15T12:00:00Z", customer={"country": "US"}, currency="USD")
    nowhere = make_request(event_time="2026-01-15T12:00:00Z", customer={"country": None}, currency="USD")
    hours = []
    for request in (summer, winter, nowhere):
        context = context_from_request(request, load_catalog())
        hours.append(derive(expand_candidates(context, [_retry(request.event_time)]), FX)["local_hour"][0])
    assert hours == [8.0, 7.0, 12.0]


def test_history_context_of_a_request() -> None:
    request = make_request(
        event_time="2026-11-03T10:00:00Z",
        history={
            "attempts": [
                {"attempt_number": 1, "connector": "stripe", "strategy": "initial", "status": "failure",
                 "created_at": "2026-11-01T10:00:00Z"},
                {"attempt_number": 2, "connector": "adyen", "strategy": "cascade", "status": "failure",
                 "created_at": "2026-11-01T10:00:05Z"},
            ],
            "nudges": [{"channel": "sms", "sent_at": "2026-11-02T10:00:00Z", "clicked_at": None}],
        },
    )  # fmt: skip
    context = context_from_request(request, load_catalog())
    assert context["n_attempts"] == 2.0
    assert context["n_silent_retries"] == 1.0
    assert context["tried_cascade"] == 1.0
    assert context["tried_retry_same"] == 0.0
    assert context["n_connectors_tried"] == 2.0
    assert context["n_nudges"] == 1.0
    assert context["last_channel"] == Channel.SMS.value
    assert context["last_nudge_clicked"] == 0.0
    derived = derive(expand_candidates(context, [_retry(request.event_time)]), FX)
    assert derived["hours_since_last_nudge"][0] == 24.0
    assert derived["days_since_first_failure"][0] == 2.0


def test_spec_json_round_trip_and_clear_errors() -> None:
    spec = FeatureSpec(numeric=["delay_hours"], vocabularies={"connector": ["stripe"]}, fx_to_usd=FX, min_count=7)
    again = FeatureSpec.from_json(spec.to_json())
    assert again == spec
    assert again.columns == ["delay_hours", "connector"]
    assert again.categorical_indices == [1]
    with pytest.raises(ValueError, match="feature spec JSON is malformed"):
        FeatureSpec.from_json('{"numeric": []}')
    with pytest.raises(KeyError, match="decision frame lacks raw columns: connector"):
        derive({name: np.zeros(1) for name in RAW_COLUMNS if name != "connector"}, FX)


def test_code_words_split_codes_into_words() -> None:
    assert code_words("AUTH_DECLINED_LOW_BALANCE") == "auth declined low balance"
    assert code_words("cardDeclinedByIssuer") == "card declined by issuer"
    assert code_words("Acquirer Error-91") == "acquirer error 91"
    assert code_words(None) == ""


# --- the request path's transform_request is transform(expand_candidates(...)), byte for byte -------------------

_SERVING_SPEC = FeatureSpec(
    numeric=list(NUMERIC_FEATURES),
    vocabularies={
        name: ["__missing__", "adyen", "card", "credit", "do_not_honor", "email", "retry", "retry_same", "stripe",
               "three_ds", "visa", "whatsapp", "2", "51", "IN", "US", "INR", "USD", "cascade", "retarget", "sms"]
        for name in CATEGORICAL_FEATURES
    },
    fx_to_usd=FX,
)  # fmt: skip


#: Around the US and New Zealand DST changes, a month end, a plain day and the eves of paydays.
_EVENT_TIMES = ["2026-11-01T05:30:00Z", "2026-11-01T06:15:00Z", "2026-04-04T13:59:00Z", "2026-11-30T23:10:00Z",
                "2026-03-08T06:59:59Z", "2026-07-14T10:00:00Z", "2026-11-25T20:00:00Z",
                "2026-02-28T18:30:00Z"]  # fmt: skip


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    country=st.sampled_from(["IN", "US", "GB", "AU", "NZ", "ZZ", None]),
    currency=st.sampled_from(["INR", "USD", "XYZ"]),
    amount=st.sampled_from([0.0, 0.01, 49.0, 499.0, 123456.78]),
    event_time=st.sampled_from(_EVENT_TIMES),
    authentication=st.sampled_from(["no_three_ds", "three_ds", "three_ds_challenge", "SCA"]),
    connector=st.sampled_from(["stripe", "adyen", "brand_new_psp"]),
    error_code=st.sampled_from(["card_declined", "do_not_honor", None]),
    nudged=st.booleans(),
    text=st.floats(0.0, 1.0),
)
def test_transform_request_equals_transform_of_the_expanded_frame(
    country: str | None,
    currency: str,
    amount: float,
    event_time: str,
    authentication: str,
    connector: str,
    error_code: str | None,
    nudged: bool,
    text: float,
) -> None:
    nudges = [{"channel": "whatsapp", "sent_at": "2026-02-01T09:00:00Z", "clicked_at": None}] if nudged else []
    request = make_request(
        event_time=event_time,
        amount=amount,
        currency=currency,
        customer={"country": country},
        payment={"authentication_type": authentication},
        failure={"connector": connector, "error_code": error_code},
        history={"attempts": [], "nudges": nudges},
    )
    context = context_from_request(request, load_catalog())
    context.update(dict.fromkeys(TEXT_COLUMNS, text))
    rule_context = build_context(request, make_merchant(connectors=["stripe", "adyen", "cybersource"]), load_catalog())
    candidates = enumerate_candidates(rule_context)
    expected = _SERVING_SPEC.transform(expand_candidates(context, candidates))
    served = _SERVING_SPEC.transform_request(context, candidates)
    assert served.dtype == np.float32
    assert served.tobytes() == expected.tobytes()


def test_transform_request_leaves_out_features_the_spec_excludes() -> None:
    request = make_request()
    context = context_from_request(request, load_catalog())
    context.update(dict.fromkeys(TEXT_COLUMNS, 0.5))
    spec = FeatureSpec(numeric=["delay_hours", "local_hour"], vocabularies={"channel": ["sms"]}, fx_to_usd=FX)
    candidates = [_retry(request.event_time + timedelta(hours=2)), Candidate(Action.STOP, request.event_time)]
    served = spec.transform_request(context, candidates)
    assert served.tobytes() == spec.transform(expand_candidates(context, candidates)).tobytes()
    assert served.shape == (2, 3)


def test_the_text_model_reads_a_bounded_prefix_of_each_part() -> None:
    # A megabyte-long message used to cost seconds of char n-grams on the request path.
    long_message = "Card declined by issuer. " * 40_000
    assert document("stripe", "card_declined", long_message) == document(
        "stripe", "card_declined", long_message[:MAX_PART_CHARS]
    )
    assert len(document("stripe", "x" * 10 * MAX_PART_CHARS, long_message)) < 5 * MAX_PART_CHARS


@settings(max_examples=300, deadline=None)
@given(
    ts=st.lists(
        st.one_of(
            st.floats(-3e9, 2e11, allow_nan=False),
            st.integers(-1000, 1000).map(lambda days: days * 86400.0),  # midnights and month ends
            st.sampled_from([math.nan, math.inf, -1e13, 1e13]),  # beyond Python's calendar: the numpy fallback
        ),
        min_size=1,
        max_size=8,
    ),
    offset=st.sampled_from([0.0, 3600.0, -18000.0, 19800.0, 45900.0, math.nan]),
)
def test_local_moments_are_local_time_on_floats(ts: list[float], offset: float) -> None:
    from model.features import _is_month_end, _local_moments, _local_time

    offsets = [offset] * len(ts)
    with np.errstate(invalid="ignore", over="ignore"):
        local = _local_time(np.array(ts), np.array(offsets))
        columns = [local.hour, local.weekday, local.day, _is_month_end(local)]
    expected = np.array(columns).T
    got = np.array(_local_moments(ts, offsets), dtype=np.float64)
    assert got.tobytes() == expected.tobytes()


def test_a_spec_keeps_the_rate_table_it_was_trained_with() -> None:
    # A model trained before IDR had a planning rate saw no USD amount for it (NaN): loaded after the shipped table
    # gained the rate, it must still see none, or its inputs would shift under it. A spec fitted now has the rate.
    request = make_request(currency="IDR", amount=150_000.0)
    context = context_from_request(request, load_catalog())
    context.update(dict.fromkeys(TEXT_COLUMNS, 0.5))
    candidates = [_retry(request.event_time)]
    old = FeatureSpec.from_json(FeatureSpec(numeric=["amount_usd"], vocabularies={}, fx_to_usd=FX).to_json())
    assert np.isnan(old.transform_request(context, candidates)[0, 0])
    now = FeatureSpec.from_counts({name: Counter() for name in CATEGORICAL_FEATURES})
    assert 7.0 <= now.transform_request(context, candidates)[0, now.columns.index("amount_usd")] <= 12.0


# --- bundles trained with the retired (1st-of-the-month) payday features -----------------------------------------

#: A spec as bundles trained before the payday features followed the rules' paydays list it (the old names).
_RETIRED_SPEC = FeatureSpec(
    numeric=[
        {"days_to_next_payday": "days_to_payday", "exec_days_to_next_payday": "exec_days_to_payday",
         "next_payday_before_exec": "payday_before_exec"}.get(name, name)
        for name in _SERVING_SPEC.numeric
    ],
    vocabularies=_SERVING_SPEC.vocabularies,
    fx_to_usd=FX,
)  # fmt: skip


@pytest.mark.parametrize(
    ("event_time", "country", "execute_at", "to_payday", "exec_to_payday", "payday_between"),
    [
        # The old definition: payday is the 1st, at the customer's local midnight; on the 1st it is today (0).
        ("2026-01-15T12:00:00Z", None, "2026-01-20T12:00:00Z", 17.0, 12.0, 0.0),
        ("2026-02-01T00:30:00Z", None, "2026-02-01T23:00:00Z", 0.0, 0.0, 0.0),
        ("2026-12-20T10:00:00Z", None, "2027-01-02T10:00:00Z", 12.0, 30.0, 1.0),
        # 01:30 IST on the 1st: payday already (the rules' payday is at 06:00, not yet).
        ("2026-11-30T20:00:00Z", "IN", "2026-11-30T21:00:00Z", 0.0, 0.0, 0.0),
        # 23:30 IST on the 30th, then 00:15 IST on the 1st: the local month changes, the UTC one does not.
        ("2026-11-30T18:00:00Z", "IN", "2026-11-30T18:45:00Z", 1.0, 0.0, 1.0),
        # 22:00 on 28 February in New York (a 28-day month), acting on 31 March.
        ("2026-03-01T03:00:00Z", "US", "2026-03-31T12:00:00Z", 1.0, 1.0, 1.0),
    ],
)
def test_the_retired_payday_features_are_built_as_they_were_trained(
    event_time: str,
    country: str | None,
    execute_at: str,
    to_payday: float,
    exec_to_payday: float,
    payday_between: float,
) -> None:
    # A bundle trained with the 1st-of-the-month payday features is served with them as they were: the history's
    # derive and the request's transform_request give those values, and the same bytes.
    request = make_request(event_time=event_time, customer={"country": country})
    context = context_from_request(request, load_catalog())
    context.update(dict.fromkeys(TEXT_COLUMNS, 0.5))
    candidates = [_retry(datetime.fromisoformat(execute_at)), Candidate(Action.STOP, request.event_time)]
    frame = expand_candidates(context, candidates)
    derived = derive(frame, FX, retired_paydays=True)
    assert derived["days_to_payday"].tolist() == [to_payday, to_payday]
    assert derived["exec_days_to_payday"].tolist() == [exec_to_payday, to_payday]
    assert derived["payday_before_exec"].tolist() == [payday_between, 0.0]
    served = _RETIRED_SPEC.transform_request(context, candidates)
    columns = [_RETIRED_SPEC.columns.index(name) for name in ("days_to_payday", "exec_days_to_payday",
                                                              "payday_before_exec")]  # fmt: skip
    assert served[:, columns].tolist() == [[to_payday, exec_to_payday, payday_between], [to_payday, to_payday, 0.0]]
    assert served.tobytes() == _RETIRED_SPEC.transform(frame).tobytes()


def test_only_a_spec_listing_the_retired_payday_features_builds_them() -> None:
    # Training writes the new features alone, and a new bundle's request path does no work for the retired ones.
    request = make_request()
    frame = expand_candidates(context_from_request(request, load_catalog()), [_retry(request.event_time)])
    assert not set(RETIRED_FEATURES) & set(derive(frame, FX))
    assert not set(RETIRED_FEATURES) & set(NUMERIC_FEATURES)
    assert _SERVING_SPEC._request_plan().retired == ()
    assert [name for _, name in _RETIRED_SPEC._request_plan().retired] == list(RETIRED_FEATURES)


def test_transform_request_equals_transform_for_a_spec_with_the_retired_payday_features() -> None:
    # Around DST changes, month ends and paydays, over every candidate of the grid, for customers in many zones.
    merchant = make_merchant(connectors=["stripe", "adyen", "cybersource"])
    for event_time in _EVENT_TIMES:
        for country in ("IN", "US", "NZ", "ZZ", None):
            request = make_request(event_time=event_time, customer={"country": country})
            context = context_from_request(request, load_catalog())
            context.update(dict.fromkeys(TEXT_COLUMNS, 0.25))
            candidates = enumerate_candidates(build_context(request, merchant, load_catalog()))
            served = _RETIRED_SPEC.transform_request(context, candidates)
            expected = _RETIRED_SPEC.transform(expand_candidates(context, candidates))
            assert served.tobytes() == expected.tobytes(), (event_time, country)
            assert not np.isnan(served[:, _RETIRED_SPEC.columns.index("payday_before_exec")]).any()

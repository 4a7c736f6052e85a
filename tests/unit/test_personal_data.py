"""One recogniser of personal data (service.personal_data), run against every place text leaves the process.

Each example says what must not come out (the middle of a phone number or of an e-mail's local part: a stored error
keeps the first and last characters, ``mask_address``) and what must come out as it went in (a timestamp, an
amount, winback's own ids). Before, the log scrubber and the stored errors' masking had a pattern each, and each
let through what the other masked.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.dialects import sqlite

from model.catalog import CATALOG_DIR
from model.simulation.params import UNSEEN_CODES
from model.textmodel import MAX_PART_CHARS, document
from service.api.logging import JsonFormatter, scrub, suspect
from service.executor.channels.inbound import _receipt
from service.executor.effects import unexpected_error
from service.executor.store import MaskedText
from service.personal_data import SUSPECT, mask_addresses_in, mask_personal_data

#: (text, what must not come out, what must come out unchanged)
EXAMPLES: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = [
    # phone numbers, however written
    ("call +919876543210 now", ("9876543",), ("call ", " now")),
    ("call +91 98765-43210 now", ("98765-4",), ("call ", " now")),
    ("call (415) 555-0100 now", ("415) 555",), ("call ", " now")),
    ("call +1 (022) 2345-6789", ("022) 2345",), ("call ",)),
    ("Invalid destination 919876543210 (not a WhatsApp user)", ("98765432",), ("Invalid destination", "WhatsApp")),
    ("8123 4567 is not reachable", ("8123 4",), ("is not reachable",)),
    ("ord_919876543210 refused", ("9876543",), ("ord_", " refused")),  # an order id made of the customer's number
    ("to 9876543210@ybl", ("987654",), ("to ",)),  # a UPI address made of the number
    ("call 9876543210.", ("987654",), ("call ",)),
    # e-mail addresses, with a subdomain, a + tag, letters of any script
    ("to priya.sharma+orders@mail.example.co.in", ("riya.sharma+orders",), ("to ",)),
    ("to jösé.müller@exämple.de failed", ("ösé.müller",), ("to ", " failed")),
    ("550 5.1.1 <asha_k@example.com>: no such user", ("sha_k",), ("550 5.1.1 <", ">: no such user")),
    # a database error quoting its parameters
    (
        '[parameters: (\'{"customer": {"phone": "+91 98765 43210", "email": "asha@example.com"}}\',)]',
        ("98765 4", "asha@"),
        ('"phone": "', '"email": "'),
    ),
    # kept as they are
    ("at 2026-12-06T20:17:18.123+00:00", (), ("2026-12-06T20:17:18.123+00:00",)),
    ("at '2026-11-01 10:15:00.000000'", (), ("2026-11-01 10:15:00.000000",)),
    ("from 2026-11-01T10:15:00+05:30 on", (), ("2026-11-01T10:15:00+05:30",)),
    ("amount 123456789.50 INR, ratio 1.123456789", (), ("123456789.50", "1.123456789")),
    ("order ord_8KQ2 amount 499.0", (), ("order ord_8KQ2 amount 499.0",)),
    ("decision dec_123456789012345678901234", (), ("dec_123456789012345678901234",)),
    ("nudge nud_9a0b1c2d3e4f5a6b12345678", (), ("nud_9a0b1c2d3e4f5a6b12345678",)),
    ("HTTP 503, retry after 120 s (code 131026)", (), ("HTTP 503, retry after 120 s (code 131026)",)),
    ("message gBEGkYiEB1VXAglK1ZEqA1YKPrU", (), ("gBEGkYiEB1VXAglK1ZEqA1YKPrU",)),
    # a provider's message id (Gupshup's gsId is a UUID) whose groups run into eight or more decimal digits: the
    # operator traces a receipt by the whole id
    ("receipt for 12345678-9abc-4def-8123-456789abcdef", (), ("12345678-9abc-4def-8123-456789abcdef",)),
    ("receipt for 4f6e2a1c-1234-5678-9abc-def012345678", (), ("4f6e2a1c-1234-5678-9abc-def012345678",)),
    ("receipt for 1A2B3C4D-0000-1111-2222-333344445555.", (), ("1A2B3C4D-0000-1111-2222-333344445555.",)),
    (
        "message ee4a68a0-1203-4c85-8dc3-49d0b3226a35 to 919876543210 failed",
        ("98765432",),
        ("message ee4a68a0-1203-4c85-8dc3-49d0b3226a35 to ", " failed"),
    ),
    # connectors' decline texts (stored with an attempt, exported to the history files the model trains on): the
    # customer's address and number go, the decline code, amount, order id and gateway reference stay
    ("card holder jane.doe@example.com declined", ("ane.doe",), ("card holder ", " declined")),
    ("OTP sent to +91 98765 43210 failed", ("98765 4",), ("OTP sent to ", " failed")),
    (
        "Declined: insufficient_funds (51), amount 1499.00 INR, order ord_8KQ2",
        (),
        ("Declined: insufficient_funds (51), amount 1499.00 INR, order ord_8KQ2",),
    ),
    ("05 - Do Not Honor; pspReference QFQTPCQ8HXSKGK82", (), ("05 - Do Not Honor; pspReference QFQTPCQ8HXSKGK82",)),
    ("payment pi_3MtwBwLkdIwHu7ix28a3tqPa: card_declined", (), ("payment pi_3MtwBwLkdIwHu7ix28a3tqPa: card_declined",)),
    ("pay_29QQoUBi66xm2f: BAD_REQUEST_ERROR", (), ("pay_29QQoUBi66xm2f: BAD_REQUEST_ERROR",)),
    ("U30 debit failed, txn 4f6e2a1c-1234-5678-9abc-def012345678", (), ("4f6e2a1c-1234-5678-9abc-def012345678",)),
    ("limit 100000 exceeded by 123456.50", (), ("limit 100000 exceeded by 123456.50",)),
    # a reference of digits only cannot be told from a phone number (or a card number): masked, first and last kept
    ("UPI RRN 412345678901 failed", ("23456789",), ("UPI RRN ", " failed")),
]


def _log_line(**fields: object) -> dict[str, object]:
    record = logging.LogRecord("winback.test", logging.WARNING, __file__, 1, "%s", (fields.pop("msg", ""),), None)
    if "exc" in fields:
        try:
            raise RuntimeError(fields.pop("exc"))
        except RuntimeError:
            record.exc_info = sys.exc_info()
    record.__dict__.update(fields)
    parsed: dict[str, object] = json.loads(JsonFormatter().format(record))
    return parsed


#: Every place text leaves the process through, as the text it lets out.
PLACES: dict[str, Callable[[str], str]] = {
    "recogniser": lambda text: mask_personal_data(text, email=lambda _: "<e>", phone=lambda _: "<p>"),
    "log scrubber": scrub,
    "log line message": lambda text: str(_log_line(msg=text)["message"]),
    "log line extra field": lambda text: str(_log_line(send_error=text)["send_error"]),
    "log line exception": lambda text: str(_log_line(exc=text)["exception"]),
    "provider error kept with a message": mask_addresses_in,
    "delivery receipt error kept with a message": lambda text: str(
        _receipt("gupshup", "gs-1", "failed", None, error=text).error
    ),
    "unexpected error kept with an action": lambda text: unexpected_error(RuntimeError(text)),
    "decline text kept with an attempt, error kept with an action": lambda text: str(
        MaskedText().process_bind_param(text, sqlite.dialect())
    ),
}


@pytest.mark.parametrize("place", list(PLACES))
@pytest.mark.parametrize(("text", "hidden", "kept"), EXAMPLES)
def test_personal_data_is_masked_and_nothing_else_wherever_text_leaves(
    place: str, text: str, hidden: tuple[str, ...], kept: tuple[str, ...]
) -> None:
    out = PLACES[place](text)
    assert [part for part in hidden if part in out] == [], out
    assert [part for part in kept if part not in out] == [], out


def test_each_caller_chooses_the_replacement() -> None:
    text = "asha@example.com or +91 98765 43210"
    assert scrub(text) == "[redacted-email] or [redacted-phone]"
    assert mask_addresses_in(text) == "a***@example.com or +91********3210"


def test_the_catalogs_decline_texts_are_stored_and_read_by_the_text_model_as_they_are() -> None:
    """Every code and message of the error catalog and of the simulation's never-seen codes (what connectors send,
    and what the simulated histories the model trains on are made of) comes out of the stored columns' masking
    unchanged, and the text model reads each as it did before it masked what it reads (``document``): masking changes
    the model's inputs only where a text holds an e-mail address or eight or more digits in a row."""
    cells = [
        cell
        for path in sorted(CATALOG_DIR.rglob("*.csv"))
        for row in csv.reader(line for line in path.read_text().splitlines() if not line.startswith("#"))
        for cell in row
    ]
    unseen = [text for codes in UNSEEN_CODES.values() for code_and_message in codes for text in code_and_message]
    assert len(cells) > 1000
    assert unseen
    assert [text for text in cells + unseen if mask_addresses_in(text) != text] == []
    assert [text for text in cells + unseen if document(None, None, text) != text[:MAX_PART_CHARS].lower()] == []


@pytest.mark.parametrize(("text", "hidden", "kept"), EXAMPLES)
def test_the_text_model_reads_a_decline_text_as_it_is_stored(
    text: str, hidden: tuple[str, ...], kept: tuple[str, ...]
) -> None:
    """The text model reads each example as the stored columns and the history files hold it (training's text and
    serving's are the same): the customer's address and number masked, everything else as it was."""
    assert document("stripe", "card_declined", text) == document("stripe", "card_declined", mask_addresses_in(text))
    message = document(None, None, text)
    assert [part for part in hidden if part.lower() in message] == [], message
    assert [part for part in kept if part.lower() not in message] == [], message


def test_a_long_run_before_an_at_sign_is_read_once() -> None:
    """A run of an address's characters before an ``@`` that no domain follows was read again from each of its
    characters (60,000 of them took ~10 s); the text model masks a request's whole decline text, so it must take a
    time in proportion to the text's length. An address at the end of such a run is still masked as one."""
    run = "a" * 60_000
    started = time.perf_counter()
    assert mask_addresses_in(f"{run}@b") == f"{run}@b"
    assert mask_addresses_in(f"{run}@example.com") == "a***@example.com"
    assert mask_addresses_in("a+" * 30_000 + "@b").endswith("a+@b")
    assert time.perf_counter() - started < 1.0


def test_an_address_glued_to_the_one_before_it_is_masked_too() -> None:
    """Where the search resumes after an address, inside a run of an address's characters, an address starting there
    is masked as before the search was bounded (looking from a run's start only left ``x`` here)."""
    assert mask_addresses_in("to a@b.com+xavier@c.de, a@b.com%yves@relay.example") == (
        "to a***@b.com+***@c.de, a***@b.com%***@relay.example"
    )


def test_the_readme_says_how_many_digits_the_logs_mask() -> None:
    """README's logging paragraph said a run of nine or more digits counts as a phone number; the recogniser takes
    eight (a national number without its country code has eight in many plans)."""
    readme = " ".join((Path(__file__).parents[2] / "README.md").read_text().split())
    (said,) = re.findall(r"a run of (\w+) or more digits \(spaces, dashes and brackets allowed\)", readme)
    fewest = {"seven": 7, "eight": 8, "nine": 9, "ten": 10}[said]
    assert scrub("ord_" + "1" * fewest) == "ord_[redacted-phone]"
    assert scrub("ord_" + "1" * (fewest - 1)) == "ord_" + "1" * (fewest - 1)


#: What the log lines' scrub looked for in one search before ``suspect``: the reference it must agree with.
_ONE_SEARCH = re.compile(r"(?i)bearer|wb_|" + SUSPECT)
_SUSPECT_PARTS = ["bearer", "BeArEr", "wb_", "WB_", "@", "1234 5678", "(555) 0123", "1234567", "İ", "ı", "ſ", "\u212a",
                  "dec_", "ord_7_", "b", "e", "a", "r", "w", "_", " ", "9", "ẞ", "ﬀ"]  # fmt: skip


@given(st.lists(st.sampled_from(_SUSPECT_PARTS) | st.text(max_size=12), max_size=12).map("".join))
@settings(max_examples=400, deadline=None)
def test_the_log_lines_look_for_what_to_mask_as_one_case_insensitive_search_did(text: str) -> None:
    """``suspect`` finds a bearer key's word, a winback key's prefix, an e-mail's @ or a phone number's digits in
    any case and any script exactly where ``(?i)bearer|wb_|`` + SUSPECT found one (the letters of ``bearer`` and
    ``wb_`` have no case-insensitive match but their own upper and lower case)."""
    assert suspect(text) is (_ONE_SEARCH.search(text) is not None)

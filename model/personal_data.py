"""The one recogniser of personal data in free text: e-mail addresses and phone numbers.

Every place text can leave the process through (log lines, provider errors and receipts kept with a message, an
action's error and a payment attempt's decline text, see ``service.executor.store.MaskedText``) masks with
:func:`mask_personal_data`; each caller chooses what replaces what is found (the logs say ``[redacted-email]``, a
stored text keeps the first and last characters, see :func:`mask_address`). Before there were two patterns, and a
phone number written with spaces, dashes or brackets, or glued to an order id after ``_``, passed one of them unmasked.

Pure text functions, in ``model`` so the text model masks the decline texts it reads with them
(``model.textmodel.document``: training's and serving's texts alike); the service imports them from here
(``service.personal_data``).

Kept as they are, because they are digits and dashes too: dates and timestamps (ISO 8601, or as SQLAlchemy prints
parameters), decimal numbers (amounts such as ``123456789.50``), winback's own decision and nudge ids (``dec_``
or ``nud_`` and 24 hex digits, which may be all decimal digits now and then), and UUIDs (a provider's message id:
Gupshup's ``gsId``; a run of its groups may be all decimal digits, and an operator needs the whole id to trace a
receipt). Anything else of eight or more digits (spaces, dashes and brackets between them) is taken for a phone
number: an order id made of the customer's number is masked too. Ten digits of Unix time cannot be told from a
phone number and are masked as well, and so is a gateway reference of digits only (a UPI RRN's twelve, a numeric
Adyen pspReference's sixteen: a card number has as many); one with letters in it (``pi_3Mtw...``, ``pay_29QQ...``)
is kept, as are decline codes and amounts of fewer than eight digits in a row.
"""

from __future__ import annotations

import re
from collections.abc import Callable

#: An e-mail address: a local part (letters of any script, digits, ``.``, ``%``, ``+``, ``-``, ``_``), ``@`` and a
#: domain of two or more labels (a subdomain, a country's second-level domain: ``a.b+tag@mail.example.co.uk``).
#: Looked for in time in proportion to the text (the text model masks a request's whole message,
#: ``model.textmodel.document``): a long run of the local part's characters before an ``@`` that is no address was
#: read again from each of its characters (20,000 letters and ``@b`` took 1 s, a megabyte most of an hour). A local
#: part of any length is taken only from a run's start (the lookbehind: one inside a run extends to the run's start
#: anyway); elsewhere, where a search resumes after an address glued to the next one (``a@b.com+x@c.de``), one of up
#: to 64 characters (RFC 5321's limit, section 4.5.3.1.1). The same matches as without these bounds, but for a local
#: part over 64 glued to an address before it (then only its last 64 characters are masked).
_LOCAL = r"[\w.%+\-]"
_DOMAIN = r"@[\w\-]+(?:\.[\w\-]+)+"
EMAIL = re.compile(rf"(?<!{_LOCAL}){_LOCAL}+{_DOMAIN}|{_LOCAL}{{1,64}}{_DOMAIN}")
#: A phone number: eight or more characters, digits with spaces, dashes or brackets between them, maybe after
#: ``+`` or ``(``, not inside a word or a decimal number (``_`` bounds it: ``ord_919876543210`` is masked).
_PHONE = r"(?<![^\W_])(?<!\d\.)\+?\(?\d[\d \-()]{6,}\d(?!\.?[^\W_])"
_KEPT = (
    r"(?<![^\W_])(?:dec|nud)_[0-9a-f]{24}(?![^\W_])"
    r"|(?<![^\W_])[0-9A-Fa-f]{8}(?:-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}(?![^\W_])"
    r"|(?<!\d)(?:19|20)\d\d-[01]\d-[0-3]\d(?:[ T][0-2]\d:[0-5]\d(?::[0-5]\d(?:\.\d+)?)?)?"
    r"(?:Z|[+\-][0-2]\d:?[0-5]\d)?(?!\d)"
)
#: Matched from left to right, what is kept first: a date is never read as a phone number.
_KEPT_OR_PHONE = re.compile(f"(?P<kept>{_KEPT})|{_PHONE}")
#: Something each pattern needs: text without any of it holds no personal data (one search; most text is ids).
#: ``SUSPECT``'s part for phone numbers: eight or more digits, spaces, dashes and brackets, from a digit to a digit.
DIGIT_RUN = r"\d[\d \-()]{6,}\d"
SUSPECT = "@|" + DIGIT_RUN
_SUSPECT = re.compile(SUSPECT)


def mask_personal_data(text: str, *, email: Callable[[str], str], phone: Callable[[str], str]) -> str:
    """``text`` with each e-mail address replaced by ``email(address)`` and each phone number by ``phone(number)``."""
    if _SUSPECT.search(text) is None:
        return text
    if "@" in text:
        text = EMAIL.sub(lambda found: email(found.group()), text)
    return _KEPT_OR_PHONE.sub(lambda found: found.group() if found.group("kept") else phone(found.group()), text)


def mask_address(address: str) -> str:
    """A phone number, e-mail address or token safe to log: ``+91******3210``, ``a***@example.com``."""
    if "@" in address:
        local, _, domain = address.partition("@")
        return f"{local[:1]}***@{domain}"
    if len(address) <= 4:
        return "*" * len(address)
    keep = 3 if address.startswith("+") else 2
    return address[:keep] + "*" * max(len(address) - keep - 4, 2) + address[-4:]


def mask_addresses_in(text: str) -> str:
    """``text`` with every e-mail address and phone number in it (this module's recogniser) masked (``mask_address``):
    an error a provider, a mail server or a connector answered may quote the customer's, and it is logged and
    stored (with a nudge, an action, a payment attempt)."""
    return mask_personal_data(text, email=mask_address, phone=mask_address)

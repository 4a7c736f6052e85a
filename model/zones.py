"""Customers' time zones by country: the one the model reads local time in, and the span quiet hours are kept in.

A customer's message must not arrive in the quiet hours of the place they are in, whatever the merchant's own time
zone (a US customer of an Indian merchant must not get one at 01:00 in New York). winback knows a customer's
country, not their zone, so a country spanning several zones is given its two extremes: a moment outside the quiet
hours at both ends of the span is outside them everywhere between (the quiet window's clock times are the same in
each zone, and the span is shorter than the hours the window leaves free).

Zone names and offsets are the IANA tz database's (Python's ``zoneinfo``); which zones a country has is its
``zone1970.tab``. Sparsely populated outlying zones (Alaska, Hawaii, Chatham, Easter Island, Lord Howe, Fernando de
Noronha) are left out of the spans: they would narrow every customer's sending hours for a fraction of a percent of
them. A US customer whose phone number carries Hawaii's or Alaska's area code (``OUTLYING_AREA_CODES``) is
presumed to be there, and that zone is kept for them first (``customer_zones``).
"""

from __future__ import annotations

import re

#: Timezone used for a customer's local time, by ISO-3166 country; other countries fall back to UTC. Countries with
#: several zones get their most populous one.
COUNTRY_TIMEZONE: dict[str, str] = {
    "IN": "Asia/Kolkata", "US": "America/New_York", "CA": "America/Toronto", "MX": "America/Mexico_City",
    "BR": "America/Sao_Paulo", "AR": "America/Argentina/Buenos_Aires", "CL": "America/Santiago",
    "CO": "America/Bogota", "PE": "America/Lima", "GB": "Europe/London", "IE": "Europe/Dublin",
    "DE": "Europe/Berlin", "FR": "Europe/Paris", "ES": "Europe/Madrid", "IT": "Europe/Rome",
    "NL": "Europe/Amsterdam", "BE": "Europe/Brussels", "CH": "Europe/Zurich", "AT": "Europe/Vienna",
    "SE": "Europe/Stockholm", "NO": "Europe/Oslo", "DK": "Europe/Copenhagen", "PL": "Europe/Warsaw",
    "PT": "Europe/Lisbon", "TR": "Europe/Istanbul", "AE": "Asia/Dubai", "SA": "Asia/Riyadh", "IL": "Asia/Jerusalem",
    "EG": "Africa/Cairo", "NG": "Africa/Lagos", "KE": "Africa/Nairobi", "ZA": "Africa/Johannesburg",
    "PK": "Asia/Karachi", "BD": "Asia/Dhaka", "SG": "Asia/Singapore", "MY": "Asia/Kuala_Lumpur",
    "ID": "Asia/Jakarta", "PH": "Asia/Manila", "TH": "Asia/Bangkok", "VN": "Asia/Ho_Chi_Minh", "CN": "Asia/Shanghai",
    "HK": "Asia/Hong_Kong", "JP": "Asia/Tokyo", "KR": "Asia/Seoul", "AU": "Australia/Sydney",
    "NZ": "Pacific/Auckland",
}  # fmt: skip

#: The easternmost and westernmost populous zones of the countries above that have several (see the module text).
COUNTRY_ZONE_SPAN: dict[str, tuple[str, str]] = {
    "US": ("America/New_York", "America/Los_Angeles"),
    "CA": ("America/St_Johns", "America/Vancouver"),
    "MX": ("America/Cancun", "America/Tijuana"),
    "BR": ("America/Sao_Paulo", "America/Rio_Branco"),
    "AU": ("Australia/Sydney", "Australia/Perth"),
    "ID": ("Asia/Jayapura", "Asia/Jakarta"),
    "ES": ("Europe/Madrid", "Atlantic/Canary"),
    "PT": ("Europe/Lisbon", "Atlantic/Azores"),
}


#: The area codes of the North American Numbering Plan that lie in a US zone left out of its span, by the zone:
#: 808 is Hawaii's and 907 Alaska's, each the state's only one (NANPA's area code map, data/README.md). A number
#: keeps its area code when it moves, so the span stays as a fallback (``customer_zones``).
OUTLYING_AREA_CODES: dict[str, str] = {"808": "Pacific/Honolulu", "907": "America/Anchorage"}
_PHONE_PUNCTUATION = re.compile(r"[\s\-().]")
_NANP_NUMBER = re.compile(r"^(?:\+?1)?([2-9]\d\d)[2-9]\d{6}$")


def outlying_zone(country: str | None, phone: str | None) -> str | None:
    """The outlying zone a US customer's phone number places them in (its area code: ``OUTLYING_AREA_CODES``), or
    None: another country, no number, or one of the span's area codes."""
    if not phone or not country or country.strip().upper() != "US":
        return None
    match = _NANP_NUMBER.match(_PHONE_PUNCTUATION.sub("", phone))
    return None if match is None else OUTLYING_AREA_CODES.get(match.group(1))


def timezone_of(country: str | None) -> str:
    """The IANA timezone used for a customer's country (UTC when the country is unknown or not in the table)."""
    if country is None:
        return "UTC"
    return COUNTRY_TIMEZONE.get(country.upper(), "UTC")


def customer_zones(country: str | None, outlying: str | None = None) -> list[tuple[str, ...]]:
    """The zones a customer of ``country`` may be in, as far as quiet hours go, widest first: the span's two ends,
    then the country's main zone alone; its one zone; nothing when the country is unknown or not in the table (then
    only the merchant's zone counts). The rules keep the widest choice that still leaves hours to send in.

    ``outlying``: the zone the customer's phone number places them in (``outlying_zone``), kept before all of
    those: with the span (the number may have moved with its owner), then alone. Left out, a Hawaiian customer of a
    New York merchant was messaged at 09:00 in Los Angeles, 06:00 in Honolulu."""
    if not country:
        return []
    code = country.strip().upper()
    zone = COUNTRY_TIMEZONE.get(code)
    if zone is None:
        return []
    span = COUNTRY_ZONE_SPAN.get(code)
    choices: list[tuple[str, ...]] = [(zone,)] if span is None else [span, (zone,)]
    if outlying is None:
        return choices
    return [(*choices[0], outlying), (outlying,), *choices]

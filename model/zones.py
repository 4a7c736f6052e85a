"""Customers' time zones by country: the one the model reads local time in, and the span quiet hours are kept in.

A customer's message must not arrive in the quiet hours of the place they are in, whatever the merchant's own time
zone (a US customer of an Indian merchant must not get one at 01:00 in New York). winback knows a customer's
country, not their zone, so a country spanning several zones is given its two extremes: a moment outside the quiet
hours at both ends of the span is outside them everywhere between (the quiet window's clock times are the same in
each zone, and the span is shorter than the hours the window leaves free).

Zone names and offsets are the IANA tz database's (Python's ``zoneinfo``); which zones a country has is its
``zone1970.tab``. Sparsely populated outlying zones (Alaska, Hawaii, Chatham, Easter Island, Lord Howe, Fernando de
Noronha) are left out of the spans: they would narrow every customer's sending hours for a fraction of a percent of
them.
"""

from __future__ import annotations

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


def timezone_of(country: str | None) -> str:
    """The IANA timezone used for a customer's country (UTC when the country is unknown or not in the table)."""
    if country is None:
        return "UTC"
    return COUNTRY_TIMEZONE.get(country.upper(), "UTC")


def customer_zones(country: str | None) -> list[tuple[str, ...]]:
    """The zones a customer of ``country`` may be in, as far as quiet hours go, widest first: the span's two ends,
    then the country's main zone alone; its one zone; nothing when the country is unknown or not in the table (then
    only the merchant's zone counts). The rules keep the widest choice that still leaves hours to send in."""
    if not country:
        return []
    code = country.strip().upper()
    zone = COUNTRY_TIMEZONE.get(code)
    if zone is None:
        return []
    span = COUNTRY_ZONE_SPAN.get(code)
    return [(zone,)] if span is None else [span, (zone,)]

"""The customer's payment-link pages (Jinja2, autoescaped; no script, no external assets)."""

from __future__ import annotations

import functools

import jinja2

from model.money import format_amount

_LAYOUT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>body{font-family:system-ui,sans-serif;max-width:28rem;margin:3rem auto;padding:0 1rem;color:#222}
.card{border:1px solid #ddd;border-radius:.5rem;padding:1.5rem}.amount{font-size:2rem;margin:.5rem 0}
button{font-size:1.1rem;padding:.7rem 1.5rem;border:0;border-radius:.4rem;background:#1a7f37;color:#fff}
.muted{color:#666;font-size:.9rem}</style></head>
<body><div class="card">{% block body %}{% endblock %}</div></body></html>"""

_PAY = """{% extends "layout.html" %}{% block body %}
<h1>Complete your payment</h1>
<p class="muted">{{ merchant_name }} &middot; order {{ order_id }}</p>
<p class="amount">{{ amount|amount_in(currency) }} {{ currency }}</p>
<form method="post" action="/pay/{{ token }}"><button type="submit" data-testid="pay">Pay now</button></form>
<p class="muted">This link works once and expires {{ expires_at }}.</p>
{% endblock %}"""

_UNSUBSCRIBE = """{% extends "layout.html" %}{% block body %}
<h1>{{ title }}</h1>
<p>{{ merchant_name }} will send no more e-mails about payments to this address.</p>
<form method="post" action="{{ action }}"><button type="submit" data-testid="unsubscribe">Unsubscribe</button></form>
{% endblock %}"""

_MESSAGE = """{% extends "layout.html" %}{% block body %}
<h1>{{ title }}</h1><p data-testid="message">{{ message }}</p>
{% endblock %}"""


#: Headers of every payment-link page. Its URL is the customer's bearer credential (whoever holds it can pay, and
#: sees the order and amount): never stored by a browser or a shared cache (the back button on a shared phone,
#: a proxy), never sent on in a Referer, never framed by another site; only the page's own inline style runs.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@functools.cache
def environment() -> jinja2.Environment:
    """The page templates, loaded once per process."""
    env = jinja2.Environment(
        loader=jinja2.DictLoader(
            {"layout.html": _LAYOUT, "pay.html": _PAY, "unsubscribe.html": _UNSUBSCRIBE, "message.html": _MESSAGE}
        ),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["amount_in"] = format_amount  # the currency's minor units, as in the messages: what is charged
    return env


def render(name: str, **context: object) -> str:
    """Render ``pay.html``, ``unsubscribe.html`` or ``message.html``."""
    return environment().get_template(name).render(**context)

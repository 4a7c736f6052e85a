"""An e-mail customer stops the merchant's payment e-mails with the link every e-mail carries.

Before: SMS and WhatsApp customers could reply STOP, but an e-mail had no unsubscribe link and no
``List-Unsubscribe`` header, and nothing in winback took an e-mail opt-out: the customer kept getting the
merchant's e-mails on every failed order. Now each e-mail carries a signed link to ``/unsubscribe`` (a page with a
button; a GET changes nothing, since mail scanners follow links) whose POST (the button, or the mail client's
one-click unsubscribe) keeps the opt-out of the order's customer's address, for this and later orders.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from model.vocab import Channel
from service.executor.optouts import address_hash
from tests.integration.test_executor import (  # noqa: F401 - make_harness is a fixture
    event,
    make_harness,
)
from tests.integration.test_provider_callbacks import opted_out_rows, with_harness
from tests.unit.test_api import Api, start

EMAIL = "a@example.com"  # the customer of tests.integration.test_executor.event()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    harness = start(tmp_path)
    yield harness
    harness.close()


def test_the_unsubscribe_link_of_an_email_keeps_the_customers_email_opt_out(
    api: Api,
    make_harness: Any,  # noqa: F811 - the fixture
) -> None:
    later = {"action": "retarget", "channel": "email", "delay": timedelta(hours=1)}
    h = make_harness(later, {"action": "stop"}, later, {"action": "stop"})
    with_harness(api, h)
    h.executor.payment_failed("m_demo", event("ord_1"))
    h.clock.advance(hours=2)
    h.drain()
    [mail] = h.outbox
    url = mail.variables["unsubscribe_url"].removeprefix("http://127.0.0.1:8000")
    assert url.startswith("/unsubscribe?merchant_id=m_demo&order_id=ord_1&token=")

    page = api.get(url)
    assert page.status_code == 200
    assert 'data-testid="unsubscribe"' in page.text
    assert opted_out_rows(h) == []  # opening the link changes nothing

    post = api.loop.run_until_complete(api.client.post(url, data={"List-Unsubscribe": "One-Click"}))
    assert post.status_code == 200, post.text
    assert "You are unsubscribed" in post.text
    assert opted_out_rows(h) == [("m_demo", "email", address_hash(Channel.EMAIL, EMAIL))]

    for forged in (url[:-1] + ("0" if url[-1] != "0" else "1"), url.replace("ord_1", "ord_2")):
        refused = api.loop.run_until_complete(api.client.post(forged))
        assert refused.status_code == 403
        assert "not valid" in refused.text

    h.executor.payment_failed("m_demo", event("ord_2"))  # the same customer's next order fails
    h.clock.advance(hours=2)
    h.drain()
    assert len(h.outbox) == 1  # no e-mail for it
    ord_2 = [r for r in h.executor.decider.requests if r.order_id == "ord_2"]  # type: ignore[attr-defined]
    assert "email" in ord_2[0].customer.opted_out_channels

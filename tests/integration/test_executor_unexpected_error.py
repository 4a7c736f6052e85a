"""An unexpected exception while a message is sent is kept with its action (``last_error``, which the order view
and the console show): its text may quote the customer's address (a library refusing a header value, a database
error quoting its statement's parameters). Before, it was kept as the exception said it; it is masked now."""

from __future__ import annotations

from typing import Any

import pytest

from model.vocab import Channel
from tests.integration.test_executor import (  # noqa: F401 - make_harness is a fixture
    _order_row,
    event,
    make_harness,
)


@pytest.mark.parametrize("channel", [Channel.SMS, Channel.EMAIL])
def test_an_unexpected_error_kept_with_a_message_action_is_masked(
    make_harness: Any,  # noqa: F811 - the fixture
    database_url: str,
    channel: Channel,
) -> None:
    h = make_harness({"action": "retarget", "channel": channel.value}, database_url=database_url)
    h.executor.payment_failed("m_demo", event())
    (message,) = h.executor.claim(1, 30, "w1", "claim-w1")
    adapter: Any = h.effects.adapters("m_demo")[channel]

    async def breaks(outbound: Any) -> Any:
        raise ValueError(f"header value {outbound.to!r} is not allowed")

    adapter.send = breaks
    h.worker.record([(message, h.effects.perform(message, _order_row(h)))])
    (kept,) = [action for action in h.view().actions if action.action_id == message.action_id]
    assert kept.last_error is not None
    assert kept.last_error.startswith("ValueError: header value "), kept.last_error
    # the customer of tests.integration.test_executor.event(): +919800000001, a@example.com
    hidden = "9800000" if channel == Channel.SMS else "a@example.com"
    assert hidden not in kept.last_error, kept.last_error

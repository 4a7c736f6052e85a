"""Defect hunt of the autonomous executor's silent retries (real executor and worker on SQLite, scripted decide()).

Each test drives the executor through the harness of ``test_executor`` and checks what the next decision point
sees and what reached the connector.
"""

from __future__ import annotations

from collections.abc import Callable

from model.catalog import load_catalog
from model.rules import build_context
from service.executor.routes import _pay
from tests.integration.test_executor import (  # noqa: F401 - make_harness is a fixture
    Harness,
    OpenCircuit,
    demo_merchant,
    event,
    make_harness,
    runtime,
    token_of,
)


def test_a_link_payment_taken_back_unsent_is_not_counted_as_a_retry(
    make_harness: Callable[..., Harness],  # noqa: F811 - the fixture
) -> None:
    """The customer pays a link while the connector's circuit is open: the payment is withdrawn (nothing was sent)
    but its attempt number stays used. The customer pays again later and is declined. The next decision point saw
    attempts 1 and 3 only, and the rules counted the missing 2 as a silent retry made: a merchant allowing one
    retry got none."""
    h = make_harness(
        {"action": "retarget", "channel": "sms"},
        {"action": "retry", "strategy": "cascade", "connector": "adyen"},
        connector=OpenCircuit(results=["failure", "success"]),
        merchants={"m_demo": demo_merchant(retry={"max_retries": 1})},
    )
    h.executor.payment_failed("m_demo", event())
    h.connector.open = False
    h.drain()  # the SMS with the link
    h.connector.open = True
    assert _pay(runtime(h), token_of(h))[0] == 503  # withdrawn: never sent
    h.connector.open = False
    h.clock.advance(seconds=31)
    assert _pay(runtime(h), token_of(h))[0] == 402  # sent, declined
    h.drain()
    request = h.executor.decider.requests[-1]  # type: ignore[attr-defined]
    assert [(a.attempt_number, a.strategy) for a in request.history.attempts] == [
        (1, "initial"),
        (2, "retarget_link"),
    ]
    assert build_context(request, h.executor.merchant("m_demo"), load_catalog()).retries_used == 0
    for _ in range(3):
        h.clock.advance(seconds=5)
        h.drain()
    assert h.view().state == "SUCCEEDED"
    assert h.connector.calls[-1].endswith(":retry:dec_2_ord_1")

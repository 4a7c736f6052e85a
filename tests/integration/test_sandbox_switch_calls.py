"""The sandbox switch's status and refund calls, through ``HttpConnector`` (what the executor's status checks and
refunds of duplicate charges use): ``GET /v1/payments/{payment_id}``, ``POST /v1/payments/{payment_id}/refunds``."""

from __future__ import annotations

import httpx
import pytest

from service.executor.connectors import ChargeRequest, HttpConnector, PermanentError, RefundRequest, TransientError
from service.executor.sandbox import create_sandbox_app, serve_in_thread
from tests.factories import make_request
from tests.integration.test_executor import START

#: An order the sandbox's outcome model recovers: the issuer was unavailable (96).
TECHNICAL = make_request(
    failure={"error_code": "processing_error", "network_decline_code": "96"}, payment={"card_network": "mastercard"}
)


def test_the_sandbox_answers_a_lost_charges_status_and_refunds_a_success_once() -> None:
    app = create_sandbox_app(seed=3, error_rate=1.0)  # every charge is made and its answer lost (503)
    server = serve_in_thread(app)
    connector = HttpConnector("adyen", server.url, None, tries=1, send_context=True, sleep=lambda _s: None)
    try:
        # The outcome model answers the same order alike: issuer unavailable (96) is recovered, 51 is not.
        for number, order in ((2, TECHNICAL), (3, make_request())):
            request = ChargeRequest(
                f"key_{number}", "m_demo", "ord_9", number, 10.0, "USD", "cascade", "adyen", START, order
            )
            with pytest.raises(TransientError):
                connector.charge(request)
        answers = [connector.status(payment, "adyen") for payment in ("ord_9_2", "ord_9_3")]
        assert [answer and answer.status for answer in answers] == ["success", "failure"]
        assert connector.status("ord_9_99", "adyen") is None  # never charged: 404 payment_not_found
        app.state.sandbox.error_rate = 0.0
        paid, declined = "ord_9_2", "ord_9_3"
        refund = RefundRequest("refund_1", "m_demo", "ord_9", paid, 10.0, "USD")
        first = connector.refund(refund)
        assert first.status == "succeeded"
        assert first.refund_id
        assert connector.refund(refund) == first  # the same key again: the stored refund, not a second one
        with pytest.raises(PermanentError, match="HTTP 422"):
            connector.refund(RefundRequest("refund_2", "m_demo", "ord_9", paid, 10.0, "USD"))  # refunded already
        with pytest.raises(PermanentError, match="HTTP 422"):
            connector.refund(RefundRequest("refund_3", "m_demo", "ord_9", declined, 10.0, "USD"))  # nothing taken
        with pytest.raises(PermanentError, match="HTTP 409"):
            connector.refund(RefundRequest("refund_1", "m_demo", "ord_9", paid, 5.0, "USD"))  # key reused
        assert httpx.get(f"{server.url}/v1/stats").json()["refunds"] == 1
    finally:
        connector.close()
        server.stop()

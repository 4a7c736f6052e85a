"""Shared test factories: plain functions returning valid domain objects; keyword overrides change fields.

Each engineer appends their own factories; don't rewrite the others'.
"""

from __future__ import annotations

from typing import Any

from model.merchant_config import MerchantConfig
from model.requests import DecisionRequest

_NESTED_REQUEST_FIELDS = ("customer", "payment", "failure", "history")
_NESTED_MERCHANT_FIELDS = ("retry", "retarget")


def _merged(defaults: dict[str, Any], overrides: dict[str, Any], nested: tuple[str, ...]) -> dict[str, Any]:
    data = dict(defaults)
    for key, value in overrides.items():
        if key in nested and isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def make_request(**overrides: Any) -> DecisionRequest:
    """The CONTRACT.md section 2 example request (a Visa credit card declined on stripe, code 51).

    Overrides replace top-level fields; a dict for ``customer``, ``payment``, ``failure`` or ``history`` is merged
    into the default one, e.g. ``make_request(payment={"card_network": "mastercard"})``. Extra fields (such as
    ``card_reattempts_30d``) are passed through.
    """
    defaults: dict[str, Any] = {
        "merchant_id": "m_demo",
        "order_id": "ord_8KQ2",
        "event_time": "2026-11-01T10:15:00Z",
        "amount": 499.0,
        "currency": "INR",
        "customer": {
            "id": "cus_71",
            "phone_present": True,
            "email_present": True,
            "app_present": False,
            "country": "IN",
            "opted_out_channels": [],
        },
        "payment": {
            "payment_method": "card",
            "payment_method_type": "credit",
            "card_network": "visa",
            "issuer": "HDFC",
            "is_recurring": True,
            "authentication_type": "no_three_ds",
            "is_network_token": False,
        },
        "failure": {
            "connector": "stripe",
            "error_code": "card_declined",
            "error_message": "Your card has insufficient funds.",
            "network_decline_code": "51",
            "merchant_advice_code": None,
            "unified_code": None,
        },
        "history": {
            "attempts": [
                {
                    "attempt_number": 1,
                    "connector": "stripe",
                    "strategy": "initial",
                    "status": "failure",
                    "error_code": "card_declined",
                    "created_at": "2026-11-01T10:15:00Z",
                }
            ],
            "nudges": [],
        },
        "available_connectors": ["stripe", "adyen", "cybersource"],
    }
    return DecisionRequest.model_validate(_merged(defaults, overrides, _NESTED_REQUEST_FIELDS))


def make_merchant(**overrides: Any) -> MerchantConfig:
    """The CONTRACT.md section 4 demo merchant (without providers/webhook/endpoints).

    Overrides replace top-level fields; a dict for ``retry`` or ``retarget`` is merged into the default one,
    e.g. ``make_merchant(retarget={"skip_days": 0})``.
    """
    defaults: dict[str, Any] = {
        "api_key_sha256": "0" * 64,
        "mode": "autonomous",
        "connectors": ["stripe", "adyen", "cybersource"],
        "retry": {
            "flows": ["retry_same", "cascade", "step_up", "clear_pan", "alternate_network"],
            "max_retries": 3,
        },
        "retarget": {
            "enabled": True,
            "channels": ["whatsapp", "sms", "email"],
            "skip_days": 1,
            "retry_window_days": 7,
            "max_nudges": 4,
            "quiet_hours": {"start": "21:00", "end": "09:00", "timezone": "Asia/Kolkata"},
            "link_ttl_hours": 48,
        },
    }
    return MerchantConfig.model_validate(_merged(defaults, overrides, _NESTED_MERCHANT_FIELDS))

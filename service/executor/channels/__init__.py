"""Retarget channels: provider adapters, templates, delivery receipts and opt-outs (see ``base.py``)."""

from service.executor.channels.base import (
    ChannelAdapter,
    ChannelError,
    DeliveryReceipt,
    InboundMessage,
    OutboundMessage,
    SendResult,
    build_adapters,
)
from service.executor.channels.inbound import is_opt_out, parse_delivery_receipts, parse_inbound
from service.executor.channels.templates import TemplateConfigError, validate_templates

__all__ = [
    "ChannelAdapter",
    "ChannelError",
    "DeliveryReceipt",
    "InboundMessage",
    "OutboundMessage",
    "SendResult",
    "TemplateConfigError",
    "build_adapters",
    "is_opt_out",
    "parse_delivery_receipts",
    "parse_inbound",
    "validate_templates",
]

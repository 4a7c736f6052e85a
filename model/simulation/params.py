"""Every number of the simulated world in one place: merchants, customers, instruments, causes, outcomes, nudges.

The world is a deliberately plausible caricature of failed-payment recovery, not a calibrated replica of any real
merchant. Probabilities are winback's own choices, shaped by public guidance (insufficient funds recover after
payday, technical declines on a quick retry or a cascade, hard declines never). Costs and FX rates come from
``model.money`` (data/economics/costs.yaml) so the simulator charges what the policy plans with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from model.vocab import Channel
from model.vocab import ErrorClass as E

#: Simulated orders' first failures start here and spread over ``WorldParams.span_days``.
SIM_START = datetime(2026, 3, 1, tzinfo=UTC)

#: Latent causes of a failure (the truth behind the observed code); the same names as the error classes.
CAUSES: tuple[E, ...] = (
    E.INSUFFICIENT_FUNDS,
    E.DO_NOT_HONOR,
    E.LIMIT_EXCEEDED,
    E.ISSUER_TECHNICAL,
    E.PROCESSOR_TECHNICAL,
    E.AUTHENTICATION_REQUIRED,
    E.SUSPECTED_FRAUD,
    E.HARD_DECLINE,
    E.BAD_CARD_DATA,
    E.TOKEN_FAILURE,
    E.CONFIGURATION,
    E.CUSTOMER_CANCELLED,
    E.DUPLICATE,
)
TECHNICAL_CAUSES: frozenset[E] = frozenset({E.ISSUER_TECHNICAL, E.PROCESSOR_TECHNICAL, E.CONFIGURATION})


@dataclass(frozen=True)
class MethodShare:
    """One payment-method family a merchant's customers use, with its share of that merchant's failures."""

    family: str  # "card", "upi_autopay", "upi_collect", "wallet": keys of WorldParams.cause_mix
    share: float
    payment_method: str
    payment_method_types: tuple[tuple[str, float], ...]  # (payment_method_type, weight)


@dataclass(frozen=True)
class MerchantProfile:
    """What the simulator knows about a merchant beyond its config (data/demo/merchants.yaml)."""

    merchant_id: str
    description: str
    country: str
    currency: str
    recurring: bool
    share: float  # share of all simulated failed orders
    amounts: tuple[tuple[float, float], ...]  # recurring: (price, weight); one-off: ((median, sigma),)
    methods: tuple[MethodShare, ...]
    initial_connector_weights: tuple[float, ...]  # routing of first attempts over the config's connectors
    three_ds_share: float  # cards authenticated with 3DS on the initial attempt
    network_token_share: float
    card_networks: tuple[tuple[str, float], ...]
    debit_share: float
    foreign_customers: tuple[tuple[str, str, float], ...]  # (country, timezone, weight) of foreign customers
    foreign_share: float
    brand: float  # multiplies the click probability of this merchant's nudges
    has_app: float  # share of customers with the merchant's app (push reachability)


_IN_CARDS = (("visa", 0.45), ("mastercard", 0.35), ("rupay", 0.2))
_WEST_CARDS = (("visa", 0.55), ("mastercard", 0.35), ("amex", 0.1))

DEFAULT_MERCHANTS: tuple[MerchantProfile, ...] = (
    MerchantProfile(
        merchant_id="m_in_stream",
        description="Indian subscription video service (monthly plans, card mandates and UPI Autopay)",
        country="IN",
        currency="INR",
        recurring=True,
        share=0.30,
        amounts=((149.0, 0.35), (199.0, 0.25), (499.0, 0.3), (649.0, 0.1)),
        methods=(
            MethodShare("card", 0.5, "card", (("credit", 0.55), ("debit", 0.45))),
            MethodShare("upi_autopay", 0.5, "upi_autopay", (("mandate", 1.0),)),
        ),
        initial_connector_weights=(0.8, 0.2),
        three_ds_share=0.05,
        network_token_share=0.55,
        card_networks=_IN_CARDS,
        debit_share=0.45,
        foreign_customers=(("AE", "Asia/Dubai", 0.5), ("US", "America/New_York", 0.3), ("GB", "Europe/London", 0.2)),
        foreign_share=0.04,
        brand=1.1,
        has_app=0.8,
    ),
    MerchantProfile(
        merchant_id="m_in_shop",
        description="Indian one-off e-commerce shop (cards, UPI collect, wallets)",
        country="IN",
        currency="INR",
        recurring=False,
        share=0.25,
        amounts=((1200.0, 0.8),),
        methods=(
            MethodShare("card", 0.45, "card", (("credit", 0.5), ("debit", 0.5))),
            MethodShare("upi_collect", 0.4, "upi", (("collect", 1.0),)),
            MethodShare("wallet", 0.15, "wallet", (("paytm", 0.5), ("phonepe", 0.3), ("amazonpay", 0.2))),
        ),
        initial_connector_weights=(0.7, 0.3),
        three_ds_share=0.9,
        network_token_share=0.35,
        card_networks=_IN_CARDS,
        debit_share=0.5,
        foreign_customers=(("AE", "Asia/Dubai", 0.6), ("SG", "Asia/Singapore", 0.4)),
        foreign_share=0.03,
        brand=0.9,
        has_app=0.4,
    ),
    MerchantProfile(
        merchant_id="m_us_saas",
        description="US SaaS subscription (monthly and annual plans, cards on file)",
        country="US",
        currency="USD",
        recurring=True,
        share=0.20,
        amounts=((12.0, 0.25), (29.0, 0.35), (49.0, 0.2), (99.0, 0.15), (299.0, 0.05)),
        methods=(MethodShare("card", 1.0, "card", (("credit", 0.7), ("debit", 0.3))),),
        initial_connector_weights=(0.75, 0.2, 0.05),
        three_ds_share=0.02,
        network_token_share=0.45,
        card_networks=_WEST_CARDS,
        debit_share=0.3,
        foreign_customers=(("CA", "America/Toronto", 0.4), ("GB", "Europe/London", 0.3), ("IN", "Asia/Kolkata", 0.3)),
        foreign_share=0.12,
        brand=1.0,
        has_app=0.3,
    ),
    MerchantProfile(
        merchant_id="m_uk_retail",
        description="UK one-off retailer (cards under SCA, wallets)",
        country="GB",
        currency="GBP",
        recurring=False,
        share=0.15,
        amounts=((60.0, 0.7),),
        methods=(
            MethodShare("card", 0.85, "card", (("credit", 0.45), ("debit", 0.55))),
            MethodShare("wallet", 0.15, "wallet", (("apple_pay", 0.6), ("google_pay", 0.4))),
        ),
        initial_connector_weights=(0.7, 0.2, 0.1),
        three_ds_share=0.7,
        network_token_share=0.3,
        card_networks=_WEST_CARDS,
        debit_share=0.55,
        foreign_customers=(("IE", "Europe/Dublin", 0.5), ("FR", "Europe/Paris", 0.5)),
        foreign_share=0.08,
        brand=0.95,
        has_app=0.35,
    ),
    MerchantProfile(
        merchant_id="m_eu_fitness",
        description="German fitness-app subscription (cards on file)",
        country="DE",
        currency="EUR",
        recurring=True,
        share=0.10,
        amounts=((9.99, 0.4), (29.9, 0.4), (49.9, 0.2)),
        methods=(MethodShare("card", 1.0, "card", (("credit", 0.4), ("debit", 0.6))),),
        initial_connector_weights=(0.8, 0.15, 0.05),
        three_ds_share=0.1,
        network_token_share=0.4,
        card_networks=(("visa", 0.5), ("mastercard", 0.45), ("amex", 0.05)),
        debit_share=0.6,
        foreign_customers=(("AT", "Europe/Vienna", 0.5), ("NL", "Europe/Amsterdam", 0.5)),
        foreign_share=0.1,
        brand=1.0,
        has_app=0.7,
    ),
)

#: Card issuers (and UPI remitter banks) by customer country, with weights.
ISSUERS: dict[str, tuple[tuple[str, float], ...]] = {
    "IN": (("HDFC", 0.26), ("ICICI", 0.2), ("SBI", 0.24), ("Axis", 0.15), ("Kotak", 0.1), ("Yes Bank", 0.05)),
    "US": (("Chase", 0.3), ("Bank of America", 0.22), ("Wells Fargo", 0.16), ("Capital One", 0.17), ("Citi", 0.15)),
    "GB": (("Barclays", 0.27), ("HSBC", 0.2), ("Lloyds", 0.23), ("Monzo", 0.15), ("NatWest", 0.15)),
    "DE": (("Sparkasse", 0.35), ("Deutsche Bank", 0.2), ("ING", 0.2), ("N26", 0.15), ("Commerzbank", 0.1)),
    "_other": (("Citi", 0.3), ("HSBC", 0.3), ("Revolut", 0.2), ("Standard Chartered", 0.2)),
}

#: Where the world's customers of a country with several time zones live: (IANA zone, share of the population). A
#: customer's own zone is what the world's click model reads the hour and the quiet hours by; the rules know only the
#: country and keep quiet hours across its populous span (`model.zones`), which leaves out Alaska and Hawaii, so the
#: simulated history has customers there too. US: Eastern 47.6%, Central 29.1%, Mountain 6.7% (Arizona, on standard
#: time all year, about 2.2% of it), Pacific 16.6% of the contiguous states; Alaska 733,391 and Hawaii 1,455,271 of
#: 331,449,281 (2020 Census); data/README.md, "Customers' time zones". A country not listed keeps one zone.
COUNTRY_ZONE_SHARES: dict[str, tuple[tuple[str, float], ...]] = {
    "US": (
        ("America/New_York", 0.474),
        ("America/Chicago", 0.290),
        ("America/Denver", 0.045),
        ("America/Phoenix", 0.022),
        ("America/Los_Angeles", 0.165),
        ("America/Anchorage", 0.0022),
        ("Pacific/Honolulu", 0.0044),
    ),
}

#: Payday patterns by country: (kind, weight); kinds are understood by world.next_payday.
PAYDAYS: dict[str, tuple[tuple[str, float], ...]] = {
    "IN": (("day_1", 0.4), ("day_7", 0.2), ("last_working", 0.25), ("day_10", 0.15)),
    "US": (("semi_monthly", 0.35), ("biweekly", 0.35), ("last_working", 0.15), ("day_1", 0.15)),
    "GB": (("last_working", 0.6), ("day_25", 0.2), ("day_1", 0.1), ("day_15", 0.1)),
    "DE": (("last_working", 0.6), ("day_1", 0.2), ("day_15", 0.2)),
    "_other": (("day_1", 0.4), ("last_working", 0.4), ("day_15", 0.2)),
}

#: Latent cause mix of failed payments, by method family and whether the payment is recurring.
CAUSE_MIX: dict[tuple[str, bool], dict[E, float]] = {
    ("card", True): {
        E.INSUFFICIENT_FUNDS: 0.45,
        E.DO_NOT_HONOR: 0.12,
        E.ISSUER_TECHNICAL: 0.06,
        E.PROCESSOR_TECHNICAL: 0.03,
        E.SUSPECTED_FRAUD: 0.03,
        E.AUTHENTICATION_REQUIRED: 0.04,
        E.TOKEN_FAILURE: 0.05,
        E.HARD_DECLINE: 0.06,
        E.BAD_CARD_DATA: 0.07,
        E.LIMIT_EXCEEDED: 0.05,
        E.CONFIGURATION: 0.01,
        E.DUPLICATE: 0.005,
        E.CUSTOMER_CANCELLED: 0.015,
    },
    ("card", False): {
        E.INSUFFICIENT_FUNDS: 0.2,
        E.DO_NOT_HONOR: 0.17,
        E.ISSUER_TECHNICAL: 0.08,
        E.PROCESSOR_TECHNICAL: 0.05,
        E.SUSPECTED_FRAUD: 0.08,
        E.AUTHENTICATION_REQUIRED: 0.12,
        E.TOKEN_FAILURE: 0.03,
        E.HARD_DECLINE: 0.05,
        E.BAD_CARD_DATA: 0.09,
        E.LIMIT_EXCEEDED: 0.05,
        E.CONFIGURATION: 0.02,
        E.DUPLICATE: 0.01,
        E.CUSTOMER_CANCELLED: 0.05,
    },
    ("upi_autopay", True): {
        E.INSUFFICIENT_FUNDS: 0.48,
        E.ISSUER_TECHNICAL: 0.15,
        E.PROCESSOR_TECHNICAL: 0.04,
        E.DO_NOT_HONOR: 0.05,
        E.LIMIT_EXCEEDED: 0.06,
        E.CUSTOMER_CANCELLED: 0.09,
        E.HARD_DECLINE: 0.05,
        E.SUSPECTED_FRAUD: 0.01,
        E.CONFIGURATION: 0.02,
        E.DUPLICATE: 0.02,
        E.BAD_CARD_DATA: 0.03,
    },
    ("upi_collect", False): {
        E.CUSTOMER_CANCELLED: 0.4,
        E.INSUFFICIENT_FUNDS: 0.14,
        E.ISSUER_TECHNICAL: 0.15,
        E.PROCESSOR_TECHNICAL: 0.05,
        E.LIMIT_EXCEEDED: 0.06,
        E.DO_NOT_HONOR: 0.05,
        E.BAD_CARD_DATA: 0.04,
        E.AUTHENTICATION_REQUIRED: 0.05,
        E.HARD_DECLINE: 0.02,
        E.SUSPECTED_FRAUD: 0.01,
        E.CONFIGURATION: 0.02,
        E.DUPLICATE: 0.01,
    },
    ("wallet", False): {
        E.CUSTOMER_CANCELLED: 0.35,
        E.INSUFFICIENT_FUNDS: 0.25,
        E.PROCESSOR_TECHNICAL: 0.1,
        E.AUTHENTICATION_REQUIRED: 0.1,
        E.ISSUER_TECHNICAL: 0.05,
        E.DO_NOT_HONOR: 0.05,
        E.SUSPECTED_FRAUD: 0.05,
        E.CONFIGURATION: 0.03,
        E.LIMIT_EXCEEDED: 0.02,
    },
}

#: How a latent cause shows up: P(observed error class | cause). Generic do-not-honor codes hide a lot.
OBSERVATION_NOISE: dict[E, dict[E, float]] = {
    E.INSUFFICIENT_FUNDS: {E.INSUFFICIENT_FUNDS: 0.68, E.DO_NOT_HONOR: 0.27, E.LIMIT_EXCEEDED: 0.05},
    E.SUSPECTED_FRAUD: {E.SUSPECTED_FRAUD: 0.35, E.DO_NOT_HONOR: 0.55, E.HARD_DECLINE: 0.1},
    E.DO_NOT_HONOR: {E.DO_NOT_HONOR: 1.0},
    E.ISSUER_TECHNICAL: {E.ISSUER_TECHNICAL: 0.85, E.DO_NOT_HONOR: 0.1, E.PROCESSOR_TECHNICAL: 0.05},
    E.PROCESSOR_TECHNICAL: {E.PROCESSOR_TECHNICAL: 0.9, E.ISSUER_TECHNICAL: 0.1},
    E.AUTHENTICATION_REQUIRED: {E.AUTHENTICATION_REQUIRED: 0.85, E.DO_NOT_HONOR: 0.15},
    E.TOKEN_FAILURE: {E.TOKEN_FAILURE: 0.8, E.DO_NOT_HONOR: 0.1, E.BAD_CARD_DATA: 0.1},
    E.HARD_DECLINE: {E.HARD_DECLINE: 0.9, E.DO_NOT_HONOR: 0.1},
    E.BAD_CARD_DATA: {E.BAD_CARD_DATA: 0.95, E.DO_NOT_HONOR: 0.05},
    E.LIMIT_EXCEEDED: {E.LIMIT_EXCEEDED: 0.75, E.DO_NOT_HONOR: 0.15, E.INSUFFICIENT_FUNDS: 0.1},
    E.CUSTOMER_CANCELLED: {E.CUSTOMER_CANCELLED: 1.0},
    E.CONFIGURATION: {E.CONFIGURATION: 0.9, E.PROCESSOR_TECHNICAL: 0.1},
    E.DUPLICATE: {E.DUPLICATE: 1.0},
}

#: Made-up connector codes that are NOT in the catalog (checked at world start), worded like familiar ones.
UNSEEN_CODES: dict[E, tuple[tuple[str, str], ...]] = {
    E.INSUFFICIENT_FUNDS: (
        ("AUTH_DECLINED_LOW_BALANCE", "Declined: low account balance"),
        ("funds_unavailable_v2", "The account does not have enough balance for this payment."),
    ),
    E.DO_NOT_HONOR: (
        ("ISSUER_GENERIC_REFUSAL", "Refused by the issuing bank without a reason"),
        ("bank_refused_txn", "The bank refused the transaction."),
    ),
    E.LIMIT_EXCEEDED: (
        ("DAILY_SPEND_CAP_HIT", "Declined: daily spending limit reached"),
        ("velocity_limit_breach", "Transaction count limit exceeded for this card."),
    ),
    E.ISSUER_TECHNICAL: (
        ("ISSUER_TIMEOUT_RETRY", "Issuer did not respond in time, please try again"),
        ("bank_link_down", "Issuing bank temporarily unreachable."),
    ),
    E.PROCESSOR_TECHNICAL: (
        ("GATEWAY_UPSTREAM_503", "Upstream gateway temporarily unavailable"),
        ("acquirer_conn_reset", "Connection to the acquirer was reset."),
    ),
    E.AUTHENTICATION_REQUIRED: (
        ("SCA_CHALLENGE_NEEDED", "Strong customer authentication is required for this payment"),
        ("needs_cardholder_auth", "Cardholder authentication required by the issuer."),
    ),
    E.SUSPECTED_FRAUD: (
        ("RISK_BLOCK_ISSUER", "Blocked by issuer risk checks"),
        ("suspicious_activity_hold", "Declined: suspicious activity on the card."),
    ),
    E.HARD_DECLINE: (
        ("ACCOUNT_CLOSED_PERMANENT", "Account closed: do not retry"),
        ("card_reported_lost_v2", "The card was reported lost."),
    ),
    E.BAD_CARD_DATA: (
        ("CARD_EXPIRY_INVALID", "Card expired or expiry date invalid"),
        ("cvv_mismatch_v2", "The security code does not match."),
    ),
    E.TOKEN_FAILURE: (
        ("NETWORK_TOKEN_INACTIVE", "The network token is not active"),
        ("cryptogram_rejected_v2", "Token cryptogram rejected by the network."),
    ),
    E.CONFIGURATION: (
        ("MERCHANT_ROUTING_DISABLED", "Merchant account not enabled for this payment method"),
        ("terminal_not_configured", "Terminal configuration missing for this currency."),
    ),
    E.CUSTOMER_CANCELLED: (
        ("COLLECT_REQUEST_TIMED_OUT", "Customer did not approve the collect request in time"),
        ("payer_declined_request", "The payer declined the payment request."),
    ),
    E.DUPLICATE: (
        ("DUPLICATE_TXN_REF", "Duplicate transaction reference"),
        ("replayed_request_id", "A request with this reference was already processed."),
    ),
}

#: Mastercard merchant advice codes attached to some causes: (code, probability).
MASTERCARD_ADVICE: dict[E, tuple[tuple[str, float], ...]] = {
    E.HARD_DECLINE: (("03", 0.4), ("21", 0.05)),
    E.INSUFFICIENT_FUNDS: (("24", 0.06), ("25", 0.06), ("26", 0.04), ("27", 0.02)),
    E.LIMIT_EXCEEDED: (("24", 0.1), ("25", 0.1), ("30", 0.03)),
    E.BAD_CARD_DATA: (("01", 0.4),),
    E.ISSUER_TECHNICAL: (("02", 0.1),),
    E.CUSTOMER_CANCELLED: (("21", 0.5),),
}

#: Connectors' technical health: base failure rate and incidents (outages lasting hours).
CONNECTOR_BASE_TECH_FAILURE: dict[str, float] = {
    "stripe": 0.008,
    "adyen": 0.01,
    "cybersource": 0.015,
    "checkout": 0.012,
    "razorpay": 0.02,
    "payu": 0.025,
}
DEFAULT_BASE_TECH_FAILURE = 0.02

#: Per-attempt connector fee relative to economics' retry fee (cheap domestic Indian PSPs, dearer legacy ones).
CONNECTOR_FEE_FACTOR: dict[str, float] = {
    "stripe": 1.0,
    "adyen": 1.1,
    "cybersource": 1.4,
    "checkout": 0.9,
    "razorpay": 0.25,
    "payu": 0.2,
}

#: Click propensity of a delivered nudge, by channel and customer country (before the other factors).
CLICK_BASE: dict[str, dict[Channel, float]] = {
    "IN": {Channel.WHATSAPP: 0.32, Channel.SMS: 0.1, Channel.EMAIL: 0.06, Channel.PUSH: 0.14},
    "US": {Channel.WHATSAPP: 0.08, Channel.SMS: 0.16, Channel.EMAIL: 0.14, Channel.PUSH: 0.12},
    "CA": {Channel.WHATSAPP: 0.1, Channel.SMS: 0.15, Channel.EMAIL: 0.14, Channel.PUSH: 0.12},
    "GB": {Channel.WHATSAPP: 0.14, Channel.SMS: 0.15, Channel.EMAIL: 0.15, Channel.PUSH: 0.12},
    "DE": {Channel.WHATSAPP: 0.16, Channel.SMS: 0.08, Channel.EMAIL: 0.15, Channel.PUSH: 0.12},
    "_other": {Channel.WHATSAPP: 0.16, Channel.SMS: 0.1, Channel.EMAIL: 0.12, Channel.PUSH: 0.1},
}

DELIVERY: dict[Channel, float] = {Channel.WHATSAPP: 0.95, Channel.SMS: 0.9, Channel.EMAIL: 0.97, Channel.PUSH: 0.7}

#: Click multiplier by the customer's local hour when the nudge arrives.
HOUR_FACTOR: tuple[float, ...] = (
    0.2,
    0.15,
    0.12,
    0.12,
    0.15,
    0.25,
    0.5,
    0.7,
    0.9,
    1.0,
    1.25,
    1.3,
    1.2,
    1.0,
    0.95,
    0.95,
    1.0,
    1.1,
    1.25,
    1.3,
    1.2,
    0.9,
    0.6,
    0.35,
)

#: P(the customer pays | clicked the link), by latent cause; funds and limits depend on timing.
PAY_GIVEN_CLICK: dict[E, float] = {
    E.INSUFFICIENT_FUNDS: 0.7,
    E.LIMIT_EXCEEDED: 0.65,
    E.DO_NOT_HONOR: 0.5,
    E.SUSPECTED_FRAUD: 0.45,
    E.HARD_DECLINE: 0.4,
    E.BAD_CARD_DATA: 0.55,
    E.AUTHENTICATION_REQUIRED: 0.65,
    E.TOKEN_FAILURE: 0.65,
    E.ISSUER_TECHNICAL: 0.65,
    E.PROCESSOR_TECHNICAL: 0.75,
    E.CUSTOMER_CANCELLED: 0.7,
    E.CONFIGURATION: 0.55,
    E.DUPLICATE: 0.3,
}
PAY_GIVEN_CLICK_BEFORE_FUNDS: dict[E, float] = {E.INSUFFICIENT_FUNDS: 0.18, E.LIMIT_EXCEEDED: 0.3}


@dataclass(frozen=True)
class WorldParams:
    """The tunable knobs of the world (the tables above are the defaults of the table-valued ones)."""

    start: datetime = SIM_START
    span_days: float = 180.0
    merchants: tuple[MerchantProfile, ...] = DEFAULT_MERCHANTS
    cause_mix: dict[tuple[str, bool], dict[E, float]] = field(default_factory=lambda: CAUSE_MIX)
    observation_noise: dict[E, dict[E, float]] = field(default_factory=lambda: OBSERVATION_NOISE)
    unseen_code_share: float = 0.04
    mac_on_mastercard: dict[E, tuple[tuple[str, float], ...]] = field(default_factory=lambda: MASTERCARD_ADVICE)
    # connector health
    base_tech_failure: dict[str, float] = field(default_factory=lambda: CONNECTOR_BASE_TECH_FAILURE)
    incidents_per_connector_day: float = 1 / 12
    incident_median_hours: float = 2.0
    incident_severity: tuple[float, float] = (0.3, 0.95)
    # issuer x connector affinity: lognormal multiplier on issuer-decided approvals
    affinity_sigma: float = 0.35
    connector_fee_factor: dict[str, float] = field(default_factory=lambda: CONNECTOR_FEE_FACTOR)
    # customers
    customer_pool_ratio: float = 0.7  # distinct customers per failed order of a merchant
    phone_present: dict[str, float] = field(default_factory=lambda: {"IN": 0.97, "US": 0.75, "_other": 0.8})
    email_present: dict[str, float] = field(default_factory=lambda: {"IN": 0.88, "_other": 0.99})
    opt_out_base: dict[Channel, float] = field(
        default_factory=lambda: {Channel.SMS: 0.08, Channel.WHATSAPP: 0.05, Channel.EMAIL: 0.03, Channel.PUSH: 0.1}
    )
    responsiveness_sigma: float = 0.5
    # retry outcomes
    silent_retry_decay: float = 0.8  # each earlier silent retry multiplies the next one's success by this
    # retargeting
    click_base: dict[str, dict[Channel, float]] = field(default_factory=lambda: CLICK_BASE)
    delivery: dict[Channel, float] = field(default_factory=lambda: DELIVERY)
    hour_factor: tuple[float, ...] = HOUR_FACTOR
    nudge_decay: float = 0.6
    quiet_hours_click_factor: float = 0.5  # a message in the quiet hours by the customer's own clock
    quiet_hours_opt_out: float = 0.15
    nudge_opt_out: float = 0.01
    click_delay_median_hours: float = 1.2
    click_delay_sigma: float = 1.2
    link_attempt_share: float = 0.85  # clickers who go on to attempt a payment
    pay_given_click: dict[E, float] = field(default_factory=lambda: PAY_GIVEN_CLICK)
    pay_given_click_before_funds: dict[E, float] = field(default_factory=lambda: PAY_GIVEN_CLICK_BEFORE_FUNDS)

"""Merchant configuration (CONTRACT.md section 4): parsed strictly, unknown keys refused with their path."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Annotated, Literal, TypeVar
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from model.vocab import RETRY_STRATEGIES, Channel, Strategy

_Listed = TypeVar("_Listed", Strategy, Channel)
_HHMM = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")
#: Zone files that are not places: ``localtime`` is whatever the host is set to, ``posixrules`` and ``Factory``
#: are tzdata internals. ZoneInfo opens them all.
_NOT_A_PLACE = frozenset({"localtime", "posixrules", "factory"})


def _http_url(value: str | None) -> str | None:
    """``value`` when it is an absolute http(s) URL (or None)."""
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"expected an http(s) URL like https://host/path, got {value!r}")
    return value


HttpUrlText = Annotated[str, AfterValidator(_http_url)]
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _env_name(value: str) -> str:
    """``value`` when it can name an environment variable: ``""`` or ``"MY KEY"`` could never be set."""
    if not _ENV_NAME.match(value):
        raise ValueError(f"expected an environment variable's name like WEBHOOK_SECRET, got {value!r}")
    return value


EnvName = Annotated[str, AfterValidator(_env_name)]


def connector_key(name: str) -> str:
    """A connector name as one connector: trimmed, in any case (``"Adyen "`` is ``adyen``), as the rules, the
    executor and the config read it."""
    return name.strip().casefold()


class ConfigError(ValueError):
    """The merchant config file is unusable; the message names the offending key's path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@functools.lru_cache(maxsize=2048)
def minute_of_day(hhmm: str) -> int:
    """``"HH:MM"`` (24h) as minutes after midnight; cached, as the decision path reads it on every request."""
    hours, minutes = hhmm.split(":")
    return int(hours) * 60 + int(minutes)


class QuietHours(_Strict):
    start: str
    end: str
    timezone: str

    @field_validator("start", "end")
    @classmethod
    def _hhmm(cls, value: str) -> str:
        if not _HHMM.match(value):
            raise ValueError(f"expected HH:MM (24h), got {value!r}")
        return value

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        if value.casefold() in _NOT_A_PLACE or value.startswith(("posix/", "right/")):
            raise ValueError(f"{value!r} is not an IANA place name: write the zone, e.g. 'Asia/Kolkata'")
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown IANA timezone {value!r}") from exc
        return value

    @property
    def start_minute(self) -> int:
        """Minutes after local midnight at which quiet hours start."""
        return minute_of_day(self.start)

    @property
    def end_minute(self) -> int:
        """Minutes after local midnight at which quiet hours end (before ``start_minute``: they wrap midnight)."""
        return minute_of_day(self.end)


# Counts and switches are StrictInt and StrictBool: taken as written, YAML's ``true`` is not 1, nor ``"3"`` or ``3.0``
# a count.
def _each_once(values: list[_Listed], what: str) -> list[_Listed]:
    """``values`` when none repeats: a list written twice over is a mistake, not a preference."""
    repeated = sorted({str(value) for value in values if values.count(value) > 1})
    if repeated:
        raise ValueError(f"{what} listed twice: {', '.join(repeated)}")
    return values


class RetryConfig(_Strict):
    flows: list[Strategy] = Field(default_factory=lambda: list(RETRY_STRATEGIES))
    max_retries: StrictInt = Field(default=3, ge=0, le=20)
    #: A one-off payment is re-attempted silently only while its customer may be at the checkout (hard rule
    #: one_off_out_of_session). true: this merchant's customers agreed to later charges of their stored card
    #: (unscheduled credential-on-file), so its one-off payments may be re-attempted later too.
    one_off_after_checkout: StrictBool = False

    @field_validator("flows")
    @classmethod
    def _only_retry_flows(cls, value: list[Strategy]) -> list[Strategy]:
        bad = [flow for flow in value if flow not in RETRY_STRATEGIES]
        if bad:
            raise ValueError(f"not a silent-retry flow: {', '.join(bad)}")
        return _each_once(value, "flow")


class RetargetConfig(_Strict):
    enabled: StrictBool = True
    channels: list[Channel] = Field(default_factory=lambda: [Channel.WHATSAPP, Channel.SMS, Channel.EMAIL])
    skip_days: StrictInt = Field(default=1, ge=0, le=30)
    retry_window_days: StrictInt = Field(default=7, ge=1, le=90)
    max_nudges: StrictInt = Field(default=4, ge=0, le=50)
    quiet_hours: QuietHours = Field(default_factory=lambda: QuietHours(start="21:00", end="09:00", timezone="UTC"))
    link_ttl_hours: StrictInt = Field(default=48, ge=1, le=24 * 90)

    @field_validator("channels")
    @classmethod
    def _channels_once(cls, value: list[Channel]) -> list[Channel]:
        return _each_once(value, "channel")


class WebhookConfig(_Strict):
    url: HttpUrlText
    secret_env: EnvName


class ProviderConfig(_Strict):
    kind: Literal["gupshup", "interakt", "karix", "smtp", "push_webhook", "fake"]
    base_url: HttpUrlText | None = None
    api_key_env: EnvName | None = None
    source: str | None = None
    host: str | None = None
    port: StrictInt | None = Field(default=None, ge=1, le=65535)
    # The sender's name at the provider: the e-mail From address (smtp), the app's name (Gupshup WhatsApp).
    sender: str | None = None
    username_env: EnvName | None = None
    password_env: EnvName | None = None
    # The merchant's approved WhatsApp template at the provider: Gupshup's template id (a UUID it assigns), or the
    # template's name at Interakt. Unset: winback's own name, ``payment_link``, which a Gupshup account never has.
    template_id: str | None = Field(default=None, min_length=1, max_length=200)
    # Gupshup SMS to India: the merchant's principal entity id on TRAI's DLT, sent as ``principalEntityId`` with
    # ``template_id`` holding the DLT template id (``dltTemplateId``); operators drop a commercial SMS without them.
    entity_id: str | None = Field(default=None, pattern=r"^\d{1,30}$")
    # How many messages a second the merchant's account at the provider takes: an e-mail relay's maximum send rate
    # (Amazon SES shows it per account), a WhatsApp number's throughput. The messages that wake together at the end
    # of the quiet hours go no faster; unset, the channel's default (service/executor/core.py ``RetryPolicy``).
    max_per_second: StrictFloat | None = Field(default=None, gt=0, allow_inf_nan=False)


class ConnectorEndpoint(_Strict):
    kind: Literal["sandbox", "http"]
    base_url: HttpUrlText | None = None
    api_key_env: EnvName | None = None
    timeout_seconds: StrictFloat = Field(default=10.0, gt=0)  # `true` is not a 1 s timeout, nor "10" a number

    @model_validator(mode="after")
    def _http_needs_url(self) -> ConnectorEndpoint:
        if self.kind == "http" and not self.base_url:
            raise ValueError("kind 'http' needs base_url")
        return self


class MerchantConfig(_Strict):
    api_key_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    #: The merchant's name as its customers know it (messages' ``merchant_name``, the pay page); the config id
    #: when absent.
    display_name: str | None = Field(default=None, min_length=1, max_length=100)
    mode: Literal["autonomous", "assisted"] = "autonomous"
    # 128 characters: the width of the stores' connector columns (as the decision request's connector names).
    connectors: list[Annotated[str, Field(max_length=128)]] = Field(min_length=1)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    retarget: RetargetConfig = Field(default_factory=RetargetConfig)
    webhook: WebhookConfig | None = None
    providers: dict[Channel, ProviderConfig] = Field(default_factory=dict)
    connector_endpoints: dict[str, ConnectorEndpoint] = Field(default_factory=dict)

    @field_validator("connectors")
    @classmethod
    def _one_place_each(cls, value: list[str]) -> list[str]:
        # The rules match connector names trimmed and in any case: "Stripe" and "stripe " are one connector.
        seen: dict[str, str] = {}
        for name in value:
            key = connector_key(name)
            if not key:
                raise ValueError("a connector name is empty")
            if key in seen:
                raise ValueError(f"{name!r} is listed twice (as {seen[key]!r} before): a pecking order names each once")
            seen[key] = name
        return value

    @field_validator("connector_endpoints")
    @classmethod
    def _one_endpoint_each(cls, value: dict[str, ConnectorEndpoint]) -> dict[str, ConnectorEndpoint]:
        # The executor looks an endpoint up trimmed and in any case: "adyen" and "Adyen" would be two entries for one
        # connector, and which one its charges went to would depend on how a decision spelt it.
        seen: dict[str, str] = {}
        for name in value:
            key = connector_key(name)
            if key in seen:
                raise ValueError(f"{name!r} and {seen[key]!r} are one connector: give it one entry")
            seen[key] = name
        return value


class WinbackConfig(_Strict):
    merchants: dict[str, MerchantConfig] = Field(min_length=1)


def _error_path(location: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in location) or "the file's top level"


def parse_config(raw: object, source: str = "<config>") -> WinbackConfig:
    """Validate an already-loaded YAML document; raise ConfigError naming every bad key's path."""
    if raw is None:
        raise ConfigError(f"{source}: the config is empty: it needs a `merchants:` mapping (CONTRACT.md section 4)")
    try:
        config = WinbackConfig.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            path = _error_path(error["loc"])
            if error["type"] == "extra_forbidden":
                problems.append(f"{path}: unknown key")
            else:
                problems.append(f"{path}: {error['msg']}")
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None
    # A key answers for one merchant only (CONTRACT.md section 2): two merchants sharing one could act for each
    # other, whichever the server happened to match first.
    owner: dict[str, str] = {}
    shared = []
    for merchant_id, merchant in config.merchants.items():
        first = owner.setdefault(merchant.api_key_sha256, merchant_id)
        if first != merchant_id:
            shared.append(f"merchants.{merchant_id}.api_key_sha256: the same key as merchant {first!r}")
    if shared:
        raise ConfigError(f"{source}: " + "; ".join(shared) + " (each merchant needs its own API key)")
    return config


def unlisted_endpoints(config: WinbackConfig) -> list[str]:
    """The ``connector_endpoints`` keys that name none of their merchant's ``connectors``, each as its key path and the
    merchant's connectors, for a warning at start.

    CONTRACT.md section 2 lets a request's ``available_connectors`` name connectors outside the config's pecking
    order, so such an entry may be meant; but it is more often a typo (``adyn`` for ``adyen``) that leaves the real
    connector without an endpoint, its silent retries sent to the sandbox (``WINBACK_SANDBOX_URL``) or dead-lettered
    while start-up looked fine. Names match trimmed and in any case, as the executor reads them.
    """
    unlisted: list[str] = []
    for merchant_id, merchant in config.merchants.items():
        listed = {connector_key(name) for name in merchant.connectors}
        unlisted.extend(
            f"merchants.{merchant_id}.connector_endpoints.{name} (its connectors: {', '.join(merchant.connectors)})"
            for name in merchant.connector_endpoints
            if connector_key(name) not in listed
        )
    return unlisted


_BOOL_TAG = "tag:yaml.org,2002:bool"
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_YAML_1_1_TAGS = frozenset({_BOOL_TAG, _INT_TAG, _FLOAT_TAG})


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader refusing a key repeated in one mapping (plain YAML keeps the last one silently).

    Booleans are YAML 1.2's, ``true`` and ``false`` only: PyYAML's YAML 1.1 also reads ``on``, ``off``, ``yes``
    and ``no`` (in three cases each) as booleans, so a key ``on:`` became ``True`` and was reported as ``1``, and
    a value ``no`` was a switch nobody wrote. Those words now stay text; a switch is written ``true``/``false``.
    Numbers are YAML 1.2's too: YAML 1.1 read ``max_retries: 010`` as 8 (octal) and ``21:00`` as 1260 (base 60);
    now ``010`` is refused as not an integer, and an unquoted ``21:00`` is the time it looks like.
    """

    yaml_implicit_resolvers = {  # noqa: RUF012 (PyYAML's own class attribute, copied per loader)
        first: [(tag, pattern) for tag, pattern in resolvers if tag not in _YAML_1_1_TAGS]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_document(self, node: yaml.Node) -> object:
        self._refuse_repeated_keys(node, (), set())
        return super().construct_document(node)  # type: ignore[no-untyped-call]

    def _refuse_repeated_keys(self, node: yaml.Node, path: tuple[int | str, ...], checked: set[int]) -> None:
        """ConfigError naming the key's path and both its lines when one mapping writes a key twice. (PyYAML's
        ``construct_mapping`` sees a mapping without where it sits, so the document is walked first, each node
        once: an alias is checked where its anchor is, and a recursive one ends the walk.)"""
        if id(node) in checked:
            return
        checked.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._refuse_repeated_keys(item, (*path, index), checked)
            return
        if not isinstance(node, yaml.MappingNode):
            return
        seen: dict[object, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *base": the keys written here may override it
                self._refuse_repeated_keys(value_node, path, checked)
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                continue  # a mapping or a list as a key: refused as unhashable when the document is built
            key = self.construct_object(key_node)  # type: ignore[no-untyped-call]
            where = (*path, key if isinstance(key, int) else str(key))
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(
                    f"duplicate key {_error_path(where)} on lines {seen[key]} and {line}: YAML would keep the last "
                    "and drop the first without a word; write the key once"
                )
            seen[key] = line
            self._refuse_repeated_keys(value_node, where, checked)


_UniqueKeyLoader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
# Decimal integers without a leading zero, and YAML 1.2's 0o/0x forms (PyYAML's constructor reads those two); a
# number with a leading zero stays text, refused where a number is due rather than read as octal. A float needs a
# point or an exponent.
_UniqueKeyLoader.add_implicit_resolver(
    _INT_TAG, re.compile(r"^(?:[-+]?(?:0|[1-9][0-9]*)|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789")
)
_UniqueKeyLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+\.[0-9]*)(?:[eE][-+]?[0-9]+)?|[-+]?[0-9]+[eE][-+]?[0-9]+"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def load_config(path: str | Path) -> WinbackConfig:
    """Read and validate a merchant config YAML file."""
    return parse_config(read_config_yaml(path), source=str(Path(path)))


def read_config_yaml(path: str | Path) -> object:
    """A merchant config file's YAML document, read as ``load_config`` reads it (YAML 1.2 scalars, a key written
    twice refused), not yet validated; ConfigError naming the file when it cannot be read."""
    file = Path(path)
    try:
        raw = yaml.load(file.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # a SafeLoader
    except FileNotFoundError:
        raise ConfigError(f"{file}: config file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:  # a folder, a file it may not read
        raise ConfigError(f"{file}: cannot read the config file: {exc.strerror or exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"{file}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from None
    return raw

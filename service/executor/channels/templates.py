"""Merchant-branded message templates: ``<templates dir>/<merchant or _default>/<channel>.<locale>.j2``.

Templates are Jinja2, rendered in a sandbox with ``StrictUndefined``: a template can read only the documented
variables (:data:`TEMPLATE_VARIABLES`), call no Python, and an unknown name is an error, not an empty string.
A template may also set, at its top level, values the channel needs besides the text:

- ``subject`` (email; one line: a line break in it, from the text or a variable, rejects the send), ``title`` (push);
- ``params``: the ordered body values of a provider-approved WhatsApp template (Gupshup ``params``, Interakt
  ``bodyValues``); ``button_params``: the dynamic part of its URL button (Interakt ``buttonValues["0"]``).
  WhatsApp refuses a parameter with a line break, a tab or more than four spaces in a row (Meta error 132018,
  reported only later, as a failed delivery), so each run of white space in them is sent as one space.

``customer_name`` comes from the merchant's event as it is: its white space is collapsed the same way before any
template sees it, so a name of only white space counts as no name (``default("there", true)``).

Lookup order for merchant ``m`` and locale ``hi-IN``: ``m/<ch>.hi-IN``, ``m/<ch>.hi``, ``_default/<ch>.hi-IN``,
``_default/<ch>.hi``, then the same with ``en``: the customer's language wins over the merchant's branding.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from jinja2 import FileSystemLoader, StrictUndefined, TemplateError, TemplateNotFound, Undefined
from jinja2.sandbox import SandboxedEnvironment

from model.datafiles import DATA_DIR
from model.merchant_config import WinbackConfig
from model.money import format_amount
from model.vocab import Channel

DEFAULT_TEMPLATES_DIR = DATA_DIR / "templates"
DEFAULT_DIR_NAME = "_default"
FALLBACK_LOCALE = "en"


@dataclass(frozen=True)
class MessageVariables:
    """Every variable a template may use, all of them in every message: what the executor sends
    (``Effects._nudge``) and, as :data:`SAMPLE_VARIABLES`, what start-up validation renders each template with.
    One definition for both, so a variable cannot be documented and checked yet never sent."""

    amount: str  # in the currency's minor units (model.money.format_amount)
    currency: str
    link_url: str
    unsubscribe_url: str  # where the customer stops the merchant's e-mails (also the List-Unsubscribe header)
    merchant_name: str
    customer_name: str  # the event's ``customer.name``; "" when it has none
    expires_at: str  # the link's expiry in the merchant's time zone (``link_expiry_text``)
    order_id: str

    def as_mapping(self) -> dict[str, str]:
        """The variables as a template sees them, with ``link_token`` (the last path segment of ``link_url``)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["link_token"] = self.link_url.rstrip("/").rsplit("/", 1)[-1]
        return values


#: The sample message start-up validation renders every template with.
SAMPLE_VARIABLES = MessageVariables(
    amount=format_amount(1499.0, "INR"),
    currency="INR",
    link_url="https://pay.example/p/SAMPLE-LINK-TOKEN",
    unsubscribe_url="https://pay.example/unsubscribe?merchant_id=m_sample&order_id=ord_sample&token=SAMPLE",
    merchant_name="Sample Merchant",
    customer_name="Asha",
    expires_at="2026-11-03 18:00 IST",
    order_id="ord_sample",
)
#: Every variable a template may use, with its sample value.
TEMPLATE_VARIABLES: Mapping[str, str] = SAMPLE_VARIABLES.as_mapping()
_FILE_NAME = re.compile(r"^(?P<channel>[a-z]+)\.(?P<locale>[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*)\.j2$")


class TemplateConfigError(ValueError):
    """A template is missing, malformed or unusable; the message names the file."""


@dataclass(frozen=True)
class RenderedMessage:
    """A template rendered for one message."""

    text: str
    source: str  # the template file, relative to the templates dir, e.g. "_default/sms.en.j2"
    subject: str | None = None
    title: str | None = None
    params: tuple[str, ...] = field(default_factory=tuple)
    button_params: tuple[str, ...] = field(default_factory=tuple)
    #: The locale of the template file (``hi`` for ``_default/whatsapp.hi.j2``): the language the text is in,
    #: which may not be the message's (a fallback), and which a provider-approved template is named by.
    locale: str = FALLBACK_LOCALE


def _locale_chain(locale: str) -> list[str]:
    """The locales to look for, most specific first: the tag in its usual case (BCP 47 tags are case-insensitive,
    so a customer's ``HI-in`` finds ``hi-IN`` and ``hi`` files), the tag as given, then its language."""
    given = locale.replace("_", "-")
    usual = _usual_case(given)
    return [candidate for candidate in dict.fromkeys((usual, given, usual.split("-")[0])) if candidate]


def _usual_case(tag: str) -> str:
    """A BCP 47 tag in its usual case (RFC 5646 2.1.1): language lower, script title, region upper (``zh-Hant-TW``)."""
    subtags = tag.split("-")
    usual = [subtags[0].lower()]
    for subtag in subtags[1:]:
        if len(subtag) == 2 and subtag.isalpha():
            usual.append(subtag.upper())
        elif len(subtag) == 4 and subtag.isalpha():
            usual.append(subtag.title())
        else:
            usual.append(subtag.lower())
    return "-".join(usual)


class TemplateStore:
    """Finds and renders templates under one directory; one sandboxed Jinja environment per store."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._env = SandboxedEnvironment(
            loader=FileSystemLoader(str(root)),
            undefined=StrictUndefined,
            autoescape=False,  # plain text channels; the email is sent as text/plain
            keep_trailing_newline=False,
            auto_reload=False,
        )

    def candidates(self, merchant_id: str, channel: Channel, locale: str) -> list[str]:
        """Template names to try, best first (see the module docstring)."""
        names: list[str] = []
        for loc in [*_locale_chain(locale), *_locale_chain(FALLBACK_LOCALE)]:
            for owner in (merchant_id, DEFAULT_DIR_NAME):
                # A file may name its locale as BCP 47 does (en-US) or as WhatsApp does (en_US): validation accepts
                # both, so the lookup finds both, the hyphen first.
                for spelling in dict.fromkeys((loc, loc.replace("-", "_"))):
                    name = f"{owner}/{channel.value}.{spelling}.j2"
                    if name not in names:
                        names.append(name)
        return names

    def resolve(self, merchant_id: str, channel: Channel, locale: str) -> str:
        """The template name used for this merchant, channel and locale; raises when there is none at all."""
        for name in self.candidates(merchant_id, channel, locale):
            if (self.root / name).is_file():
                return name
        raise TemplateConfigError(
            f"no {channel.value} template for merchant {merchant_id!r}: looked for "
            + ", ".join(str(self.root / n) for n in self.candidates(merchant_id, channel, locale))
        )

    def render_file(self, name: str, variables: Mapping[str, str]) -> RenderedMessage:
        """Render one template file; raises TemplateConfigError naming the file on any template error."""
        path = self.root / name
        # Only documented variables reach a template, so what renders at start-up is what renders at send time.
        known = {key: value for key, value in variables.items() if key in TEMPLATE_VARIABLES}
        if "customer_name" in known:
            known["customer_name"] = single_spaced(known["customer_name"])
        if "link_url" in known and "link_token" not in known:
            known["link_token"] = known["link_url"].rstrip("/").rsplit("/", 1)[-1]
        try:
            template = self._env.get_template(name)
            module = template.make_module(known)
        except TemplateNotFound:
            raise TemplateConfigError(f"{path}: template not found") from None
        except TemplateError as exc:
            lineno = getattr(exc, "lineno", None)
            line = f" line {lineno}" if lineno else ""
            raise TemplateConfigError(f"{path}{line}: {exc}") from None
        except (ArithmeticError, LookupError, TypeError, ValueError) as exc:
            # An expression that fails on some values only (a division by the length of an empty name): the start-up
            # check renders sample values, so this one shows at a send, and is that send's rejection.
            raise TemplateConfigError(f"{path}: {type(exc).__name__}: {exc}") from None
        exported = module.__dict__
        named = _FILE_NAME.match(path.name)
        return RenderedMessage(
            locale=named["locale"] if named else FALLBACK_LOCALE,
            text=str(module).strip(),
            source=name,
            subject=_one_line(_optional_text(exported.get("subject"), path, "subject"), path, "subject"),
            title=_optional_text(exported.get("title"), path, "title"),
            params=tuple(map(single_spaced, _text_list(exported.get("params"), path, "params"))),
            button_params=tuple(map(single_spaced, _text_list(exported.get("button_params"), path, "button_params"))),
        )

    def render(self, merchant_id: str, channel: Channel, locale: str, variables: Mapping[str, str]) -> RenderedMessage:
        """Resolve and render the template of one message."""
        return self.render_file(self.resolve(merchant_id, channel, locale), variables)

    def files(self, owners: Iterable[str]) -> list[str]:
        """Every template file under the given owner folders (merchant ids or ``_default``), sorted."""
        names: list[str] = []
        for owner in owners:
            folder = self.root / owner
            if folder.is_dir():
                names.extend(f"{owner}/{p.name}" for p in sorted(folder.iterdir()) if p.is_file())
        return names


def link_expiry_text(expires_at: datetime, timezone: str) -> str:
    """When a link expires, as its customer reads it: the date and time in ``timezone`` (the merchant's, an IANA
    name) with the zone's abbreviation, ``2026-11-03 23:30 IST`` (``UTC+04`` where the zone has none)."""
    if expires_at.tzinfo is None:
        raise ValueError(f"the link's expiry {expires_at.isoformat()} has no time zone; it must be an instant")
    local = expires_at.astimezone(ZoneInfo(timezone))
    zone = local.tzname() or ""
    return f"{local:%Y-%m-%d %H:%M} {'UTC' + zone if zone[:1] in '+-' else zone}".rstrip()


def single_spaced(text: str) -> str:
    """``text`` with every run of white space (line breaks and tabs too) made one space, and trimmed."""
    return " ".join(text.split())


def _optional_text(value: object, path: Path, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TemplateConfigError(f"{path}: '{what}' must be a string, got {type(value).__name__}")
    return value.strip()


def _one_line(value: str | None, path: Path, what: str) -> str | None:
    """``value`` when it is one line: an e-mail header cannot hold a line break (the e-mail library refuses one,
    and a break taken from a variable could smuggle in a header of its own)."""
    if value is not None and len(value.splitlines()) > 1:
        raise TemplateConfigError(f"{path}: '{what}' renders with a line break; it must be one line: {value!r:.120}")
    return value


def _text_list(value: object, path: Path, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise TemplateConfigError(f"{path}: '{what}' must be a list of strings")
    for item in value:
        if isinstance(item, Undefined):
            raise TemplateConfigError(f"{path}: '{what}' uses an undefined variable: {item._undefined_name!r}")
        if not isinstance(item, str):
            raise TemplateConfigError(f"{path}: '{what}' must hold only strings, got {type(item).__name__}")
    return tuple(value)


@functools.cache
def template_store(root: Path = DEFAULT_TEMPLATES_DIR) -> TemplateStore:
    """The (cached) store of one templates directory."""
    return TemplateStore(root)


def check_rendered(rendered: RenderedMessage, path: Path, channel: Channel, link_url: str) -> None:
    """Refuse a rendering that lacks the payment link or a field its channel needs."""
    carried = [rendered.text, *rendered.params, *rendered.button_params]
    token = link_url.rsplit("/", 1)[-1]
    if not any(link_url in part for part in carried) and not any(token == part for part in rendered.button_params):
        raise TemplateConfigError(
            f"{path}: the rendered message does not contain the payment link ({{{{ link_url }}}})"
        )
    if not rendered.text:
        raise TemplateConfigError(f"{path}: the template renders to an empty message")
    if channel is Channel.EMAIL and not rendered.subject:
        raise TemplateConfigError(f"{path}: an email template must set a subject ({{% set subject = '...' %}})")


def validate_templates(config: WinbackConfig, templates_dir: Path | None = None) -> None:
    """Start-up check: every template renders with sample variables and carries the payment link.

    Checks each file under ``_default/`` and under each configured merchant's folder, and that every
    merchant has a template (its own or the default) in English for each of its retarget channels.
    Raises TemplateConfigError naming the offending file (all problems, one per line).
    """
    store = template_store(templates_dir or DEFAULT_TEMPLATES_DIR)
    problems: list[str] = []
    if not store.root.is_dir():
        raise TemplateConfigError(f"{store.root}: templates directory not found")
    for name in store.files([DEFAULT_DIR_NAME, *config.merchants]):
        path = store.root / name
        match = _FILE_NAME.match(path.name)
        if match is None or match["channel"] not in {c.value for c in Channel}:
            problems.append(
                f"{path}: not a template name of the form <channel>.<locale>.j2 "
                f"(channel one of {', '.join(c.value for c in Channel)})"
            )
            continue
        try:
            rendered = store.render_file(name, TEMPLATE_VARIABLES)
            check_rendered(rendered, path, Channel(match["channel"]), TEMPLATE_VARIABLES["link_url"])
        except TemplateConfigError as exc:
            problems.append(str(exc))
    for merchant_id, merchant in config.merchants.items():
        if not merchant.retarget.enabled:
            continue
        for channel in merchant.retarget.channels:
            try:
                store.resolve(merchant_id, channel, FALLBACK_LOCALE)
            except TemplateConfigError as exc:
                problems.append(str(exc))
    if problems:
        raise TemplateConfigError("invalid message templates:\n" + "\n".join(problems))

"""Error-code catalog and normalisation of any connector error to a standard class.

The facts live as CSV tables in ``data/catalog/`` (provenance in ``data/README.md``); this module loads them once
and answers: which :class:`~model.vocab.ErrorClass` a failure belongs to, its Visa decline category, its
Mastercard merchant advice, and which codes each source knows (the simulator draws its vocabularies from there).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from model.datafiles import DATA_DIR
from model.vocab import ErrorClass

if TYPE_CHECKING:
    import pandas as pd

    from model.requests import DecisionRequest

#: Where the shipped tables live, relative to the repository.
CATALOG_DIR: Path = DATA_DIR / "catalog"

ISO8583 = "iso8583"
NPCI_UPI = "npci_upi"
UNIFIED = "unified_code"
MESSAGE = "message"
UNKNOWN_SOURCE = "unknown"

#: Response codes that mean approval: never a Visa decline category.
_APPROVAL_CODES = frozenset({"00", "08", "10", "11", "85"})
#: Connector spellings seen in exports that mean one of our connector tables.
_CONNECTOR_ALIASES = {"checkout.com": "checkout", "checkout_com": "checkout", "checkoutcom": "checkout"}
_VISA_CODE = re.compile(r"^[0-9A-Z]{2}$")
_SPACES = re.compile(r"\s+")

#: Columns normalise_frame reads; only the first two must be present.
FRAME_INPUT_COLUMNS: tuple[str, ...] = (
    "connector",
    "error_code",
    "error_message",
    "network_decline_code",
    "merchant_advice_code",
    "unified_code",
    "card_network",
    "payment_method",
)
_FRAME_REQUIRED = ("connector", "error_code")


@dataclass(frozen=True)
class CatalogCode:
    """One known code of one source table (a connector's, ISO 8583, NPCI UPI, ...)."""

    source: str  # "stripe", "adyen", "iso8583", "npci_upi", ...
    code: str
    message: str
    error_class: ErrorClass
    network_decline_code: str | None = None  # the ISO 8583 / NPCI code this connector code usually carries
    generic: bool = False  # the code says only "declined/failed": more specific evidence wins over it
    decline_type: str | None = None  # NPCI only: "business", "technical" or "depends"
    card_network: str | None = None  # ISO 8583 only: the network a network-specific meaning applies to


@dataclass(frozen=True)
class MerchantAdvice:
    """A Mastercard merchant advice code and what it allows."""

    code: str  # two digits, e.g. "03"
    meaning: str
    never_retry: bool
    needs_card_update: bool
    wait_hours: float | None  # minimum wait before a re-attempt, when the code states one
    wait_basis: str | None = None  # "mastercard" (stated by the code) or "winback_choice" (our conservative pick)


@dataclass(frozen=True)
class VisaCategoryRule:
    """Visa's re-attempt rule for one decline category."""

    category: int
    name: str
    reattempt_allowed: bool
    max_reattempts: int | None  # per card within window_days; None when no re-attempt is allowed
    window_days: int


@dataclass(frozen=True)
class NormalisedError:
    error_class: ErrorClass
    visa_category: int | None  # 1..4 for a Visa card whose network decline code is categorised, else None
    merchant_advice: MerchantAdvice | None
    matched_by: str  # which table decided: "stripe", "iso8583", "npci_upi", "unified_code", "message", "unknown"
    known_code: bool  # False when the connector's (connector, error_code) pair is not in the catalog
    network_decline_code: str | None = None  # the normalised network code used (given, or implied by the connector)


class Normaliser(Protocol):
    """What callers need of the error catalog (:class:`ErrorCatalog` is one; memoising wrappers are others)."""

    def normalise(
        self,
        connector: str,
        error_code: str | None,
        error_message: str | None = None,
        network_decline_code: str | None = None,
        merchant_advice_code: str | None = None,
        unified_code: str | None = None,
        card_network: str | None = None,
        payment_method: str | None = None,
    ) -> NormalisedError:
        """Map a connector error to a standard class."""
        ...


def normalise_request(catalog: Normaliser, request: DecisionRequest) -> NormalisedError:
    """``catalog``'s verdict on a decision request's failure, on the request's payment (card network, method)."""
    failure, payment = request.failure, request.payment
    return catalog.normalise(
        failure.connector,
        failure.error_code,
        failure.error_message,
        failure.network_decline_code,
        failure.merchant_advice_code,
        failure.unified_code,
        payment.card_network,
        payment.payment_method,
    )


@dataclass(frozen=True)
class _MessageRule:
    pattern: re.Pattern[str]
    error_class: ErrorClass


def _as_text(value: object) -> str | None:
    """Any scalar as stripped text; None, NaN and blanks as None (history files are messy)."""
    if value is None:
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            value = int(value)
    try:
        text = str(value).strip()
    except Exception:  # an object whose __str__ fails is as good as missing
        return None
    return text or None


def _connector_key(connector: object) -> str | None:
    text = _as_text(connector)
    if text is None:
        return None
    key = text.casefold()
    return _CONNECTOR_ALIASES.get(key, key)


def _code_key(code: object) -> str | None:
    text = _as_text(code)
    return None if text is None else text.casefold()


def _network_key(code: object) -> str | None:
    """ISO 8583 / NPCI / MAC codes: upper case, and numeric codes as two digits at least ("5" == "05" == "005")."""
    text = _as_text(code)
    if text is None:
        return None
    key = text.upper()
    if key.isdigit():
        key = key.lstrip("0").zfill(2)
    return key


def _message_key(message: object) -> str | None:
    text = _as_text(message)
    if text is None:
        return None
    return _SPACES.sub(" ", text.casefold().replace("_", " "))


def _is_upi(payment_method: str | None) -> bool:
    return payment_method is not None and payment_method.casefold().startswith("upi")


class CatalogError(ValueError):
    """A shipped catalog table is malformed."""


def _rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a catalog CSV as (line number, row); lines starting with '#' are provenance notes."""
    if not path.is_file():
        raise CatalogError(f"catalog table {path} is missing")
    with path.open(encoding="utf-8", newline="") as handle:
        numbered = [(n, line) for n, line in enumerate(handle, start=1) if not line.startswith("#")]
    reader = csv.reader(line for _, line in numbered)
    header = next(reader, None)
    if header is None:
        raise CatalogError(f"{path.name}: no header row")
    for (number, _), values in zip(numbered[1:], reader, strict=False):
        if len(values) > len(header):
            raise CatalogError(f"{path.name} line {number}: {len(values)} fields, the header has {len(header)}")
        row = dict(zip(header, (v.strip() for v in values), strict=False))
        yield number, {k: row.get(k, "") for k in header}


def _need(path: Path, line: int, row: dict[str, str], column: str) -> str:
    value = row.get(column, "")
    if not value:
        raise CatalogError(f"{path.name} line {line}: column {column!r} is empty or missing")
    return value


def _error_class(path: Path, line: int, value: str) -> ErrorClass:
    try:
        return ErrorClass(value)
    except ValueError:
        known = ", ".join(c.value for c in ErrorClass)
        raise CatalogError(f"{path.name} line {line}: unknown error_class {value!r} (known: {known})") from None


def _bool(path: Path, line: int, value: str) -> bool:
    lowered = value.casefold()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "":
        return False
    raise CatalogError(f"{path.name} line {line}: expected true or false, got {value!r}")


class ErrorCatalog:
    """The loaded catalog. Build it with :func:`load_catalog` (cached) or ``ErrorCatalog.from_directory``."""

    version: str

    def __init__(
        self,
        tables: dict[str, list[CatalogCode]],
        visa_categories: dict[str, int],
        visa_rules: dict[int, VisaCategoryRule],
        merchant_advice: dict[str, MerchantAdvice],
        message_rules: list[_MessageRule],
        version: str,
    ) -> None:
        self.version = version
        self._tables = tables
        self._visa_categories = visa_categories
        self._visa_rules = visa_rules
        self._mac = merchant_advice
        self._message_rules = message_rules
        self._connector_index: dict[tuple[str, str], CatalogCode] = {}
        self._network_index: dict[str, dict[tuple[str, str], CatalogCode]] = {ISO8583: {}, NPCI_UPI: {}}
        self._unified_index: dict[str, CatalogCode] = {}
        for source, codes in tables.items():
            for entry in codes:
                if source in self._network_index:
                    network = (entry.card_network or "").casefold()
                    self._network_index[source][(network, entry.code)] = entry
                elif source == UNIFIED:
                    self._unified_index[entry.code.casefold()] = entry
                else:
                    self._connector_index[(source, entry.code.casefold())] = entry

    # ----------------------------------------------------------------------------------------------- loading

    @classmethod
    def from_directory(cls, directory: Path) -> ErrorCatalog:
        """Load every table of a catalog directory (the layout of ``data/catalog/``)."""
        files = sorted(p for p in directory.rglob("*.csv") if p.is_file())
        if not files:
            raise CatalogError(f"no catalog tables (*.csv) found in {directory}")
        digest = hashlib.sha256()
        for path in files:
            digest.update(path.relative_to(directory).as_posix().encode())
            digest.update(b"\0")
            digest.update(path.read_bytes())
            digest.update(b"\0")

        tables: dict[str, list[CatalogCode]] = {}
        aliases: dict[str, list[CatalogCode]] = {}
        tables[ISO8583] = cls._read_iso(directory / "iso8583.csv")
        tables[NPCI_UPI] = cls._read_npci(directory / "npci_upi.csv")
        tables[UNIFIED] = cls._read_unified(directory / "unified_codes.csv")
        for path in sorted((directory / "connectors").glob("*.csv")):
            codes, alias_codes = cls._read_connector(path)
            tables[path.stem.casefold()] = codes
            aliases[path.stem.casefold()] = alias_codes
        catalog = cls(
            tables=tables,
            visa_categories=cls._read_visa_categories(directory / "visa_categories.csv"),
            visa_rules=cls._read_visa_rules(directory / "visa_category_rules.csv"),
            merchant_advice=cls._read_mac(directory / "mastercard_mac.csv"),
            message_rules=cls._read_message_rules(directory / "message_rules.csv"),
            version=digest.hexdigest()[:12],
        )
        for source, alias_codes in aliases.items():
            for entry in alias_codes:
                catalog._connector_index.setdefault((source, entry.code.casefold()), entry)
        return catalog

    @staticmethod
    def _read_iso(path: Path) -> list[CatalogCode]:
        out = []
        for line, row in _rows(path):
            code = _network_key(_need(path, line, row, "code"))
            assert code is not None
            out.append(
                CatalogCode(
                    source=ISO8583,
                    code=code,
                    message=_need(path, line, row, "message"),
                    error_class=_error_class(path, line, _need(path, line, row, "error_class")),
                    network_decline_code=code,
                    generic=_bool(path, line, row.get("generic", "")),
                    card_network=row.get("card_network") or None,
                )
            )
        return out

    @staticmethod
    def _read_npci(path: Path) -> list[CatalogCode]:
        out = []
        for line, row in _rows(path):
            code = _network_key(_need(path, line, row, "code"))
            assert code is not None
            decline_type = _need(path, line, row, "decline_type")
            if decline_type not in ("business", "technical", "depends"):
                raise CatalogError(
                    f"{path.name} line {line}: decline_type must be business, technical or depends, "
                    f"got {decline_type!r}"
                )
            out.append(
                CatalogCode(
                    source=NPCI_UPI,
                    code=code,
                    message=_need(path, line, row, "message"),
                    error_class=_error_class(path, line, _need(path, line, row, "error_class")),
                    network_decline_code=code,
                    generic=_bool(path, line, row.get("generic", "")),
                    decline_type=decline_type,
                )
            )
        return out

    @staticmethod
    def _read_unified(path: Path) -> list[CatalogCode]:
        return [
            CatalogCode(
                source=UNIFIED,
                code=_need(path, line, row, "code"),
                message=_need(path, line, row, "message"),
                error_class=_error_class(path, line, _need(path, line, row, "error_class")),
                generic=_bool(path, line, row.get("generic", "")),
            )
            for line, row in _rows(path)
        ]

    @staticmethod
    def _read_connector(path: Path) -> tuple[list[CatalogCode], list[CatalogCode]]:
        source = path.stem.casefold()
        codes: list[CatalogCode] = []
        alias_codes: list[CatalogCode] = []
        seen: set[str] = set()
        for line, row in _rows(path):
            code = _need(path, line, row, "code")
            if code.casefold() in seen:
                raise CatalogError(f"{path.name} line {line}: code {code!r} is listed twice")
            seen.add(code.casefold())
            entry = CatalogCode(
                source=source,
                code=code,
                message=_need(path, line, row, "message"),
                error_class=_error_class(path, line, _need(path, line, row, "error_class")),
                network_decline_code=_network_key(row.get("network_decline_code")),
                generic=_bool(path, line, row.get("generic", "")),
            )
            codes.append(entry)
            for alias in filter(None, (a.strip() for a in row.get("aliases", "").split("|"))):
                alias_codes.append(
                    CatalogCode(
                        source=source,
                        code=alias,
                        message=entry.message,
                        error_class=entry.error_class,
                        network_decline_code=entry.network_decline_code,
                        generic=entry.generic,
                    )
                )
        return codes, alias_codes

    @staticmethod
    def _read_visa_categories(path: Path) -> dict[str, int]:
        out: dict[str, int] = {}
        for line, row in _rows(path):
            code = _network_key(_need(path, line, row, "code"))
            assert code is not None
            category = _need(path, line, row, "category")
            if category not in ("1", "2", "3"):
                raise CatalogError(f"{path.name} line {line}: listed categories are 1, 2 or 3, got {category!r}")
            if code in out:
                raise CatalogError(f"{path.name} line {line}: code {code!r} is listed twice")
            out[code] = int(category)
        return out

    @staticmethod
    def _read_visa_rules(path: Path) -> dict[int, VisaCategoryRule]:
        out: dict[int, VisaCategoryRule] = {}
        for line, row in _rows(path):
            category = int(_need(path, line, row, "category"))
            cap = row.get("max_reattempts", "")
            out[category] = VisaCategoryRule(
                category=category,
                name=_need(path, line, row, "name"),
                reattempt_allowed=_bool(path, line, _need(path, line, row, "reattempt_allowed")),
                max_reattempts=int(cap) if cap else None,
                window_days=int(_need(path, line, row, "window_days")),
            )
        return out

    @staticmethod
    def _read_mac(path: Path) -> dict[str, MerchantAdvice]:
        out: dict[str, MerchantAdvice] = {}
        for line, row in _rows(path):
            code = _network_key(_need(path, line, row, "code"))
            assert code is not None
            wait = row.get("wait_hours", "")
            out[code] = MerchantAdvice(
                code=code,
                meaning=_need(path, line, row, "meaning"),
                never_retry=_bool(path, line, _need(path, line, row, "never_retry")),
                needs_card_update=_bool(path, line, _need(path, line, row, "needs_card_update")),
                wait_hours=float(wait) if wait else None,
                wait_basis=row.get("wait_basis") or None,
            )
        return out

    @staticmethod
    def _read_message_rules(path: Path) -> list[_MessageRule]:
        out = []
        for line, row in _rows(path):
            pattern = _need(path, line, row, "pattern")
            try:
                compiled = re.compile(pattern)
            except re.error as exc:
                raise CatalogError(f"{path.name} line {line}: bad regular expression {pattern!r}: {exc}") from None
            out.append(_MessageRule(compiled, _error_class(path, line, _need(path, line, row, "error_class"))))
        return out

    # ----------------------------------------------------------------------------------------------- lookups

    def sources(self) -> list[str]:
        """Names of all code tables: connectors plus ``iso8583``, ``npci_upi`` and ``unified_code``."""
        return sorted(self._tables)

    def connectors(self) -> list[str]:
        """Names of the connectors that have their own table."""
        return sorted(s for s in self._tables if s not in (ISO8583, NPCI_UPI, UNIFIED))

    def codes(self, source: str, error_class: ErrorClass | None = None) -> list[CatalogCode]:
        """Known codes of one source table, optionally of one class (used by the simulator's vocabularies)."""
        key = _connector_key(source) or ""
        if key not in self._tables:
            raise KeyError(f"unknown catalog source {source!r}; known sources: {', '.join(self.sources())}")
        table = self._tables[key]
        if error_class is None:
            return list(table)
        return [c for c in table if c.error_class == error_class]

    def lookup(self, connector: str | None, error_code: str | None) -> CatalogCode | None:
        """The connector's own entry for ``error_code`` (its code or documented reason text), if catalogued."""
        conn, code = _connector_key(connector), _code_key(error_code)
        if conn is None or code is None:
            return None
        return self._connector_index.get((conn, code))

    def network_code(
        self, code: str | None, payment_method: str | None = None, card_network: str | None = None
    ) -> CatalogCode | None:
        """The ISO 8583 (cards) or NPCI (UPI) entry of a network decline code; network-specific meanings first."""
        key = _network_key(code)
        if key is None:
            return None
        order = (NPCI_UPI, ISO8583) if _is_upi(_as_text(payment_method)) else (ISO8583, NPCI_UPI)
        network = (_as_text(card_network) or "").casefold()
        for source in order:
            index = self._network_index[source]
            entry = index.get((network, key)) if network else None
            entry = entry or index.get(("", key))
            if entry is not None:
                return entry
        return None

    def upi_decline_type(self, code: str | None) -> str | None:
        """NPCI's split of a UPI code: "business", "technical" or "depends"; None when not catalogued."""
        key = _network_key(code)
        entry = self._network_index[NPCI_UPI].get(("", key)) if key else None
        return entry.decline_type if entry else None

    def visa_category(self, network_decline_code: str | None) -> int | None:
        """Visa decline category (1-4) of a Visa response code; None for missing, approval or malformed codes."""
        key = _network_key(network_decline_code)
        if key is None:
            return None
        listed = self._visa_categories.get(key)
        if listed is not None:
            return listed
        if key in _APPROVAL_CODES or not _VISA_CODE.match(key):
            return None
        return 4  # Visa files every other decline code under category 4 (generic)

    def visa_category_rule(self, category: int | None) -> VisaCategoryRule | None:
        """Visa's re-attempt rule (allowed?, cap per card, window) for a category."""
        return self._visa_rules.get(category) if category is not None else None

    def merchant_advice(self, code: str | None) -> MerchantAdvice | None:
        """The Mastercard merchant advice code's meaning and rules; None when missing or not catalogued."""
        key = _network_key(code)
        return self._mac.get(key) if key is not None else None

    def classify_message(self, message: str | None) -> ErrorClass | None:
        """The class the keyword rules give a message, or None when no rule matches."""
        text = _message_key(message)
        if text is None:
            return None
        for rule in self._message_rules:
            if rule.pattern.search(text):
                return rule.error_class
        return None

    # ----------------------------------------------------------------------------------------- normalisation

    def normalise(
        self,
        connector: str,
        error_code: str | None,
        error_message: str | None = None,
        network_decline_code: str | None = None,
        merchant_advice_code: str | None = None,
        unified_code: str | None = None,
        card_network: str | None = None,
        payment_method: str | None = None,
    ) -> NormalisedError:
        """Map any connector error to a standard class; unknown input gives ErrorClass.UNKNOWN, never raises.

        Trust order: the connector's own code table, a unified code, the network decline code (ISO 8583 for
        cards, NPCI for UPI), keyword rules on the message. Codes that say only "declined" (``generic``) decide
        only when none of those does.
        """
        try:
            return self._normalise(
                connector,
                error_code,
                error_message,
                network_decline_code,
                merchant_advice_code,
                unified_code,
                card_network,
                payment_method,
            )
        except Exception:  # a bad row of input must never break scoring or training
            return NormalisedError(ErrorClass.UNKNOWN, None, None, UNKNOWN_SOURCE, False)

    def _normalise(
        self,
        connector: object,
        error_code: object,
        error_message: object,
        network_decline_code: object,
        merchant_advice_code: object,
        unified_code: object,
        card_network: object,
        payment_method: object,
    ) -> NormalisedError:
        conn = _connector_key(connector)
        code = _code_key(error_code)
        own = self._connector_index.get((conn, code)) if conn is not None and code is not None else None
        method = _as_text(payment_method)
        network_name = _as_text(card_network)
        given_network = _network_key(network_decline_code)
        effective_network = given_network or (own.network_decline_code if own else None)

        unified_key = _code_key(unified_code)
        unified = self._unified_index.get(unified_key) if unified_key else None
        network = self.network_code(given_network, method, network_name)

        decided: tuple[ErrorClass, str] | None = None
        fallbacks: list[tuple[ErrorClass, str]] = []
        for entry in (own, unified, network):
            if entry is None or entry.error_class == ErrorClass.UNKNOWN:
                continue
            if entry.generic:
                fallbacks.append((entry.error_class, entry.source))
            else:
                decided = (entry.error_class, entry.source)
                break
        if decided is None:
            by_message = self.classify_message(_as_text(error_message))
            if by_message is not None:
                decided = (by_message, MESSAGE)
            elif fallbacks:
                decided = fallbacks[0]
            else:
                decided = (ErrorClass.UNKNOWN, UNKNOWN_SOURCE)

        is_visa = network_name is not None and network_name.casefold() == "visa" and not _is_upi(method)
        return NormalisedError(
            error_class=decided[0],
            visa_category=self.visa_category(effective_network) if is_visa else None,
            merchant_advice=self.merchant_advice(_as_text(merchant_advice_code)),
            matched_by=decided[1],
            known_code=own is not None,
            network_decline_code=effective_network,
        )

    def normalise_frame(self, df: pd.DataFrame) -> pd.DataFrame:
        """Normalise a whole history frame: one :meth:`normalise` call per distinct input tuple.

        Reads the columns of ``FRAME_INPUT_COLUMNS`` (``connector`` and ``error_code`` are required, the others
        default to missing) and returns, on the same index, ``error_class`` (str), ``visa_category`` (Int8),
        ``mac`` (the catalogued merchant advice code, or None) and ``known_code`` (bool).
        """
        import numpy as np
        import pandas as pd

        missing = [c for c in _FRAME_REQUIRED if c not in df.columns]
        if missing:
            raise ValueError(f"normalise_frame: missing required column(s): {', '.join(missing)}")
        n = len(df)
        present = [c for c in FRAME_INPUT_COLUMNS if c in df.columns]
        key = np.zeros(n, dtype=np.int64)
        for column in present:
            codes, uniques = pd.factorize(df[column], use_na_sentinel=True)
            combined = key * (len(uniques) + 1) + (codes.astype(np.int64) + 1)
            key, _ = pd.factorize(combined)
            key = key.astype(np.int64)
        _, first_row, inverse = np.unique(key, return_index=True, return_inverse=True)

        columns = {c: df[c].to_numpy(dtype=object) for c in present}
        classes: list[str] = []
        categories: list[int | None] = []
        macs: list[str | None] = []
        known: list[bool] = []
        for row in first_row:
            args: dict[str, Any] = {c: columns[c][row] for c in present}
            result = self.normalise(**args)
            classes.append(result.error_class.value)
            categories.append(result.visa_category)
            macs.append(result.merchant_advice.code if result.merchant_advice else None)
            known.append(result.known_code)

        return pd.DataFrame(
            {
                "error_class": np.asarray(classes, dtype=object)[inverse],
                "visa_category": pd.array(categories, dtype="Int8")[inverse],
                "mac": np.asarray(macs, dtype=object)[inverse],
                "known_code": np.asarray(known, dtype=bool)[inverse],
            },
            index=df.index,
        )


#: Classes the public decline guidance calls soft (worth a silent re-attempt: later, elsewhere or with
#: authentication) and hard (never approved as sent: new details, the cardholder or the bank must act first).
#: ``configuration`` and ``unknown`` have no published verdict (a configuration error fails on its own route and
#: passes on another), so they are in neither.
SOFT_DECLINE_CLASSES: frozenset[ErrorClass] = frozenset(
    {
        ErrorClass.INSUFFICIENT_FUNDS,
        ErrorClass.DO_NOT_HONOR,
        ErrorClass.LIMIT_EXCEEDED,
        ErrorClass.ISSUER_TECHNICAL,
        ErrorClass.PROCESSOR_TECHNICAL,
        ErrorClass.TOKEN_FAILURE,
        ErrorClass.AUTHENTICATION_REQUIRED,  # an SCA soft decline: retried with authentication (step-up)
    }
)
HARD_DECLINE_CLASSES: frozenset[ErrorClass] = frozenset(
    {
        ErrorClass.HARD_DECLINE,
        ErrorClass.BAD_CARD_DATA,
        ErrorClass.SUSPECTED_FRAUD,
        ErrorClass.CUSTOMER_CANCELLED,
        ErrorClass.DUPLICATE,
    }
)


def published_retryable(error: NormalisedError) -> bool | None:
    """The catalog's published retryability of a normalised error, None where it publishes none.

    Not retryable: a Visa category 1 ("issuer will never approve") or 3 ("cannot approve with these details",
    which a silent re-attempt does not change) decline, a Mastercard merchant advice code that forbids retries, a
    hard-decline class; retryable: a soft-decline class (``SOFT_DECLINE_CLASSES``). Training chooses the
    threshold of decide()'s ``retryable`` verdict to agree best with it (model.training.choose_retryable_threshold).
    """
    advice = error.merchant_advice
    if error.visa_category in (1, 3) or (advice is not None and advice.never_retry):
        return False
    if error.error_class in SOFT_DECLINE_CLASSES:
        return True
    return False if error.error_class in HARD_DECLINE_CLASSES else None


def normalise_frame(df: pd.DataFrame) -> pd.DataFrame:
    """:meth:`ErrorCatalog.normalise_frame` with the shipped catalog."""
    return load_catalog().normalise_frame(df)


#: Most characters (all of an error's strings together) a per-error cache keeps. The caches are bounded by entries
#: and a caller may send error codes and messages of any length: one full of 32 KB codes held ~100 KB an entry.
MEMO_MAX_CHARS = 1024


def memo_worthy(*texts: object) -> bool:
    """Whether an entry keyed by ``texts`` is small enough for a per-error cache (``MEMO_MAX_CHARS``); what is not
    text (None, a number from a history frame) counts as nothing."""
    return sum(len(text) for text in texts if isinstance(text, str)) <= MEMO_MAX_CHARS


#: Distinct inputs the API's and the executor's catalog remember (a bundle's features keep their own 4,096).
REQUEST_CATALOG_MEMO_SIZE = 65_536


class MemoCatalog(ErrorCatalog):
    """A catalog whose ``normalise`` is remembered per distinct input, up to ``maxsize`` inputs (then emptied).

    The one memo of the request path: the API and the executor (decide()'s rules ask several times per request)
    and a model bundle's features (`model.bundle.ModelBundle`) each hold one. ``normalise`` is a pure function of
    its arguments (strings or None; anything else is answered as ``inner`` answers it, as in a history frame's
    cells), so remembering cannot change an answer; an input longer than ``MEMO_MAX_CHARS`` is normalised every
    time rather than kept. Every other method answers as ``inner``'s.
    """

    def __init__(self, inner: ErrorCatalog, maxsize: int) -> None:
        self.__dict__.update(inner.__dict__)
        self._inner = inner
        self._maxsize = maxsize
        self._cache: dict[tuple[str | None, ...], NormalisedError] = {}

    @property
    def inner(self) -> ErrorCatalog:
        """The catalog whose answers this one remembers."""
        return self._inner

    def over(self, inner: ErrorCatalog) -> MemoCatalog:
        """A memo of the same size over ``inner``, remembering nothing yet (e.g. over an overlay of this one's)."""
        return MemoCatalog(inner, self._maxsize)

    def normalise(
        self,
        connector: str,
        error_code: str | None,
        error_message: str | None = None,
        network_decline_code: str | None = None,
        merchant_advice_code: str | None = None,
        unified_code: str | None = None,
        card_network: str | None = None,
        payment_method: str | None = None,
    ) -> NormalisedError:
        """Remembered ``ErrorCatalog.normalise``."""
        key = (
            connector, error_code, error_message, network_decline_code, merchant_advice_code, unified_code,
            card_network, payment_method,
        )  # fmt: skip
        try:
            hit = self._cache.get(key)
        except TypeError:  # an unhashable input (not a request's): answered as the catalog answers it, not kept
            return self._inner.normalise(*key)
        if hit is None:
            hit = self._inner.normalise(*key)
            if not memo_worthy(*key):
                return hit
            if len(self._cache) >= self._maxsize:
                self._cache.clear()
            self._cache[key] = hit
        return hit


@functools.cache
def load_catalog() -> ErrorCatalog:
    """The shipped catalog (data/catalog/), loaded once per process."""
    return ErrorCatalog.from_directory(CATALOG_DIR)


def catalog_mismatch(scorer: object, catalog: ErrorCatalog | None) -> str | None:
    """Why ``scorer``'s catalog (the ``catalog_version`` it was trained with, when it says) is not ``catalog``'s
    (the one its features read when it serves: the shipped one when None), naming both versions; None when they are
    the same. A model whose codes' classes moved since training reads them as the serving catalog classifies them
    (a newer catalog, or another gateway status map overlay: retrain to learn them)."""
    trained = getattr(scorer, "catalog_version", None)
    if not isinstance(trained, str):
        return None
    serving = (catalog if catalog is not None else load_catalog()).version
    if trained == serving:
        return None
    return f"trained with error catalog {trained}, serving with error catalog {serving}"

"""Cold start from a switch's gateway status map (Hyperswitch ``gateway_status_map``).

A merchant moving to winback from Hyperswitch already has a table saying, per connector error, whether the switch
retries it. :func:`read_gsm` reads its CSV export (the table's own column names), :func:`to_overlay` turns each
row into winback's terms (an error class, a retryability prior, whether step-up / clear-PAN / alternate network
is worth trying) and :func:`write_overlay` / :func:`load_overlay` keep that as a small CSV (by default under
``data/generated/`` of a checkout, ``./generated/`` when installed). :func:`with_overlay` extends an error catalog
with the overlay's codes that the catalog does not know, so the rules and the rules-only priors treat a code no
history has shown yet the way the switch did. The shipped catalog always wins over the overlay for codes it knows.

How a row becomes a class, first match wins: its ``unified_code`` in the catalog's unified table; its
``error_category``; the catalog's keyword rules on its message (and ``unified_message``); then its flags and
decision (``step_up_possible`` -> authentication required, ``clear_pan_possible`` -> token failure, ``retry`` or
``requeue`` -> processor technical, i.e. worth a cascade); else unknown, which the overlay leaves out.
Hyperswitch's ``decision`` values are ``retry``, ``requeue`` and ``do_default`` (the switch's default handling:
no automatic retry).
"""

from __future__ import annotations

import copy
import csv
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.catalog import CatalogCode, ErrorCatalog, MemoCatalog, load_catalog
from model.datafiles import GENERATED_DIR
from model.vocab import ErrorClass

#: Default place of the imported overlay: generated data, outside the package (``model.datafiles.GENERATED_DIR``).
DEFAULT_OVERLAY = GENERATED_DIR / "gsm_overlay.csv"

#: Columns of Hyperswitch's ``gateway_status_map`` table; the first four must be present in an import.
GSM_COLUMNS: tuple[str, ...] = (
    "connector", "flow", "sub_flow", "code", "message", "status", "router_error", "decision", "step_up_possible",
    "unified_code", "unified_message", "error_category", "clear_pan_possible", "feature", "feature_data",
    "created_at", "last_modified",
)  # fmt: skip
GSM_REQUIRED: tuple[str, ...] = ("connector", "code", "message", "decision")
GSM_DECISIONS: frozenset[str] = frozenset({"retry", "requeue", "do_default"})

#: Hyperswitch ``ErrorCategory`` values and the winback class each most often means.
ERROR_CATEGORY_CLASS: dict[str, ErrorClass] = {
    "frm_decline": ErrorClass.SUSPECTED_FRAUD,
    "processor_downtime": ErrorClass.PROCESSOR_TECHNICAL,
    "processor_decline_unauthorized": ErrorClass.DO_NOT_HONOR,
    "issue_with_payment_method": ErrorClass.BAD_CARD_DATA,
    "processor_decline_incorrect_data": ErrorClass.BAD_CARD_DATA,
}

#: Columns of the overlay file written by :func:`write_overlay`.
OVERLAY_COLUMNS: tuple[str, ...] = (
    "connector", "code", "message", "error_class", "class_from", "decision", "retryable_prior", "step_up_possible",
    "clear_pan_possible", "alternate_network_possible", "unified_code", "flow", "sub_flow",
)  # fmt: skip

_TRUE = frozenset({"true", "t", "1", "yes", "y"})
_FALSE = frozenset({"false", "f", "0", "no", "n", ""})


class GsmError(ValueError):
    """The gateway status map file cannot be used; the message names the line and column."""


@dataclass(frozen=True)
class GsmRow:
    """One row of a gateway status map, as exported."""

    line: int
    connector: str
    code: str
    message: str
    decision: str
    flow: str = ""
    sub_flow: str = ""
    status: str = ""
    router_error: str | None = None
    step_up_possible: bool = False
    clear_pan_possible: bool = False
    alternate_network_possible: bool = False
    unified_code: str | None = None
    unified_message: str | None = None
    error_category: str | None = None


@dataclass(frozen=True)
class OverlayEntry:
    """What winback takes from one gateway status map row."""

    connector: str
    code: str
    message: str
    error_class: ErrorClass
    class_from: str  # "unified_code", "error_category", "message", "step_up_possible", "clear_pan_possible", ...
    decision: str
    retryable_prior: bool  # the switch retries it automatically (decision retry or requeue)
    step_up_possible: bool
    clear_pan_possible: bool
    alternate_network_possible: bool
    unified_code: str | None = None
    flow: str = ""
    sub_flow: str = ""


def _flag(value: str, line: int, column: str) -> bool:
    text = value.strip().casefold()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise GsmError(f"line {line}: column {column!r} must be true or false, got {value!r}")


def _optional(value: str | None) -> str | None:
    text = (value or "").strip()
    return None if text == "" or text.casefold() in ("null", "none") else text


def _alternate_network(feature_data: str | None) -> bool:
    # feature_data is JSON like {"retry": {"alternate_network_possible": true, ...}}; only that flag is read.
    import json

    text = _optional(feature_data)
    if text is None:
        return False
    try:
        data = json.loads(text)
    except ValueError:
        return False
    retry = data.get("retry") if isinstance(data, dict) else None
    return bool(isinstance(retry, dict) and retry.get("alternate_network_possible") is True)


def read_gsm(path: str | Path) -> list[GsmRow]:
    """Read a gateway status map CSV (header row with Hyperswitch's column names; extra columns are ignored).

    Raises GsmError naming the file and the problem: a missing required column, an empty required value, an
    unknown decision or a malformed boolean, with the line number.
    """
    source = Path(path)
    if not source.is_file():
        raise GsmError(f"{source}: no such file")
    with source.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip().casefold() for name in (reader.fieldnames or [])]
        missing = [name for name in GSM_REQUIRED if name not in header]
        if missing:
            raise GsmError(
                f"{source}: missing column(s) {', '.join(missing)}; a gateway status map export has "
                f"{', '.join(GSM_COLUMNS[:13])}"
            )
        rows: list[GsmRow] = []
        for line, raw in enumerate(reader, start=2):
            values = {(k or "").strip().casefold(): (v or "") for k, v in raw.items()}
            for name in ("connector", "code", "decision"):
                if not values.get(name, "").strip():
                    raise GsmError(f"{source} line {line}: column {name!r} is empty")
            decision = values["decision"].strip().casefold()
            if decision not in GSM_DECISIONS:
                raise GsmError(
                    f"{source} line {line}: decision must be one of {', '.join(sorted(GSM_DECISIONS))}, "
                    f"got {values['decision']!r}"
                )
            try:
                rows.append(
                    GsmRow(
                        line=line,
                        connector=values["connector"].strip(),
                        code=values["code"].strip(),
                        message=values.get("message", "").strip(),
                        decision=decision,
                        flow=values.get("flow", "").strip(),
                        sub_flow=values.get("sub_flow", "").strip(),
                        status=values.get("status", "").strip(),
                        router_error=_optional(values.get("router_error")),
                        step_up_possible=_flag(values.get("step_up_possible", ""), line, "step_up_possible"),
                        clear_pan_possible=_flag(values.get("clear_pan_possible", ""), line, "clear_pan_possible"),
                        alternate_network_possible=_alternate_network(values.get("feature_data")),
                        unified_code=_optional(values.get("unified_code")),
                        unified_message=_optional(values.get("unified_message")),
                        error_category=_optional(values.get("error_category")),
                    )
                )
            except GsmError as exc:
                raise GsmError(f"{source} {exc}") from None
    return rows


def classify_row(row: GsmRow, catalog: ErrorCatalog | None = None) -> tuple[ErrorClass, str]:
    """The winback class of one gateway status map row and what decided it (see the module docstring)."""
    catalog = catalog or load_catalog()
    if row.unified_code:
        unified = catalog.normalise("", None, unified_code=row.unified_code)
        if unified.matched_by == "unified_code" and unified.error_class != ErrorClass.UNKNOWN:
            return unified.error_class, "unified_code"
    if row.error_category:
        by_category = ERROR_CATEGORY_CLASS.get(row.error_category.casefold())
        if by_category is not None:
            return by_category, "error_category"
    for text in (row.message, row.unified_message):
        by_message = catalog.classify_message(text)
        if by_message is not None:
            return by_message, "message"
    if row.step_up_possible:
        return ErrorClass.AUTHENTICATION_REQUIRED, "step_up_possible"
    if row.clear_pan_possible:
        return ErrorClass.TOKEN_FAILURE, "clear_pan_possible"
    if row.decision in ("retry", "requeue"):
        return ErrorClass.PROCESSOR_TECHNICAL, "decision"
    return ErrorClass.UNKNOWN, "none"


def to_overlay(rows: Iterable[GsmRow], catalog: ErrorCatalog | None = None) -> list[OverlayEntry]:
    """Overlay entries of the rows, one per (connector, code); the first row of a code wins (flows share codes)."""
    catalog = catalog or load_catalog()
    seen: set[tuple[str, str]] = set()
    out: list[OverlayEntry] = []
    for row in rows:
        key = (row.connector.casefold(), row.code.casefold())
        if key in seen:
            continue
        seen.add(key)
        error_class, source = classify_row(row, catalog)
        out.append(
            OverlayEntry(
                connector=row.connector,
                code=row.code,
                message=row.message,
                error_class=error_class,
                class_from=source,
                decision=row.decision,
                retryable_prior=row.decision in ("retry", "requeue"),
                step_up_possible=row.step_up_possible,
                clear_pan_possible=row.clear_pan_possible,
                alternate_network_possible=row.alternate_network_possible,
                unified_code=row.unified_code,
                flow=row.flow,
                sub_flow=row.sub_flow,
            )
        )
    return out


def write_overlay(entries: Iterable[OverlayEntry], path: str | Path = DEFAULT_OVERLAY) -> Path:
    """Write overlay entries as CSV (``OVERLAY_COLUMNS``); the folder is created if needed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(OVERLAY_COLUMNS)
        for e in entries:
            writer.writerow(
                [
                    e.connector, e.code, e.message, e.error_class.value, e.class_from, e.decision,
                    str(e.retryable_prior).lower(), str(e.step_up_possible).lower(),
                    str(e.clear_pan_possible).lower(), str(e.alternate_network_possible).lower(),
                    e.unified_code or "", e.flow, e.sub_flow,
                ]
            )  # fmt: skip
    return target


def load_overlay(path: str | Path = DEFAULT_OVERLAY) -> list[OverlayEntry]:
    """Read an overlay written by :func:`write_overlay`."""
    source = Path(path)
    if not source.is_file():
        raise GsmError(f"{source}: no such overlay file (create it with `winback codes import-gsm FILE.csv`)")
    out = []
    with source.open(encoding="utf-8", newline="") as handle:
        for line, row in enumerate(csv.DictReader(handle), start=2):
            try:
                error_class = ErrorClass(row["error_class"])
            except (KeyError, ValueError):
                raise GsmError(f"{source} line {line}: unknown error_class {row.get('error_class')!r}") from None
            out.append(
                OverlayEntry(
                    connector=row["connector"],
                    code=row["code"],
                    message=row["message"],
                    error_class=error_class,
                    class_from=row["class_from"],
                    decision=row["decision"],
                    retryable_prior=_flag(row["retryable_prior"], line, "retryable_prior"),
                    step_up_possible=_flag(row["step_up_possible"], line, "step_up_possible"),
                    clear_pan_possible=_flag(row["clear_pan_possible"], line, "clear_pan_possible"),
                    alternate_network_possible=_flag(
                        row["alternate_network_possible"], line, "alternate_network_possible"
                    ),
                    unified_code=row["unified_code"] or None,
                    flow=row["flow"],
                    sub_flow=row["sub_flow"],
                )
            )
    return out


class GsmOverlaySetting(BaseSettings):
    """``WINBACK_GSM_OVERLAY`` (or its .env entry), read alike by every process that decides and by training: the
    API's and the executor's settings inherit it, and `winback train` / `retrain` build their features with it. All
    must classify the overlay's codes alike, or one decides otherwise than the others for them. The registered
    pyfunc does not read it: it serves with the overlay its version was trained with (``model.registry``)."""

    model_config = SettingsConfigDict(env_prefix="WINBACK_", env_file=".env", extra="ignore", frozen=True)

    gsm_overlay: Path | None = Field(
        default=None, description="Gateway status map overlay (winback codes import-gsm) for codes the catalog lacks."
    )


#: A model bundle's metadata key naming the overlay its features were trained with (``TrainingOverlay.recorded``),
#: None when it was trained without one (a bundle saved before the key existed was trained without one too).
GSM_OVERLAY_KEY = "gsm_overlay"
#: The file name of the copy a training run reads, logs with its model and a registered pyfunc serves with.
OVERLAY_FILE_NAME = "gsm_overlay.csv"


def overlay_digest(path: str | Path) -> str:
    """The SHA-256 of an overlay file's bytes: which overlay a model was trained with, whatever its path."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass(frozen=True)
class TrainingOverlay:
    """The overlay a training run reads: the operator's file (``WINBACK_GSM_OVERLAY``), the copy the run reads
    and logs with its model, and that copy's SHA-256."""

    source: Path
    file: Path
    sha256: str

    @classmethod
    def snapshot(cls, overlay: str | Path, folder: str | Path) -> TrainingOverlay:
        """Copy ``overlay`` into ``folder`` (``OVERLAY_FILE_NAME``) after checking it reads as an overlay: a run of
        hours trains with, and logs, the overlay as it was when it started. GsmError names a missing or bad file."""
        source = Path(overlay).absolute()
        load_overlay(source)
        target = Path(folder) / OVERLAY_FILE_NAME
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
        return cls(source=source, file=target, sha256=overlay_digest(target))

    def recorded(self) -> dict[str, str]:
        """What a bundle's metadata keeps of it (``GSM_OVERLAY_KEY``)."""
        return {"file": str(self.source), "sha256": self.sha256}

    def catalog(self) -> ErrorCatalog:
        """The shipped catalog with this overlay, as a serving process with the same overlay builds it."""
        return serving_catalog(self.file)


def describe_overlay(recorded: object) -> str:
    """A bundle's ``GSM_OVERLAY_KEY`` entry in words: the overlay's file and SHA-256, or that there was none."""
    if isinstance(recorded, dict):
        return f"gateway status map overlay {recorded.get('file')} (sha256 {recorded.get('sha256')})"
    return "no gateway status map overlay"


def serving_catalog(overlay: str | Path | None) -> ErrorCatalog:
    """The catalog a deciding process serves with: the shipped one, extended with ``overlay`` (``WINBACK_GSM_OVERLAY``)
    when one is set. The API and the executor both build theirs here, so they classify every code alike."""
    catalog = load_catalog()
    return catalog if overlay is None else with_overlay(catalog, load_overlay(overlay))


def with_overlay(catalog: ErrorCatalog, entries: Iterable[OverlayEntry]) -> ErrorCatalog:
    """A copy of ``catalog`` that also knows the overlay's codes it lacks (the catalog's own entries win).

    Entries of class unknown are left out: they would only hide the catalog's other evidence (network code,
    message). The copy's ``version`` says an overlay was applied, so a model trained with it records that. A memo
    (`model.catalog.MemoCatalog`) answers from the catalog it wraps: that one is overlaid, in a fresh memo.
    """
    if isinstance(catalog, MemoCatalog):
        return catalog.over(with_overlay(catalog.inner, entries))
    extended = copy.copy(catalog)
    index = dict(catalog._connector_index)
    digest = hashlib.sha256(catalog.version.encode())
    added = 0
    for entry in entries:
        if entry.error_class == ErrorClass.UNKNOWN:
            continue
        key = (entry.connector.casefold(), entry.code.casefold())
        if key in index:
            continue
        index[key] = CatalogCode(
            source=key[0], code=entry.code, message=entry.message or entry.code, error_class=entry.error_class
        )
        digest.update(f"{key[0]}\0{key[1]}\0{entry.error_class.value}\0".encode())
        added += 1
    extended._connector_index = index
    if added:
        extended.version = f"{catalog.version}+gsm{digest.hexdigest()[:8]}"
    return extended


def overlay_prior(entries: Iterable[OverlayEntry]) -> dict[str, OverlayEntry]:
    """Overlay entries by ``model.codewatch.code_key`` (for reports: the switch's verdict on a new code)."""
    from model.codewatch import code_key

    return {code_key(e.connector, e.code): e for e in entries}

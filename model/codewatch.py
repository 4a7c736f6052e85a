"""Watching error codes the serving model has little or no evidence about, for the feedback loop.

At training time :func:`code_inventory` records, per (connector, error code), how many silent retries the model
learned from and how many succeeded, with a representative message; the bundle carries it in its metadata
(``KNOWN_CODES_KEY``) and answers ``code_support(connector, code)`` from it. ``decide()`` explores more where the
support is thin, and :func:`new_codes_report` lists the codes of a history that the model saw fewer than ``k``
times: counts, outcomes so far, the model's current retryability estimate, and the nearest known codes by text
(cosine similarity in the text model's TF-IDF space).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt
import pandas as pd

if TYPE_CHECKING:
    from model.catalog import ErrorCatalog

#: Key of the bundle metadata entry holding :func:`code_inventory`'s rows.
KNOWN_CODES_KEY = "known_codes"
#: Most codes an inventory keeps (the most frequent first), so a bundle's metadata stays small.
MAX_INVENTORY = 5000
#: Default support below which a code counts as "new" in the report.
DEFAULT_MIN_SUPPORT = 30


def code_key(connector: object, code: object) -> str:
    """The lookup key of an error code: connector and code, case-folded and stripped (``"stripe|card_declined"``)."""

    def text(value: object) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        return str(value).strip().casefold()

    return f"{text(connector)}|{text(code)}"


@dataclass(frozen=True)
class KnownCode:
    """One code of a model's training data: silent retries after it, their successes, a representative message."""

    connector: str
    code: str
    message: str | None
    support: int  # silent retries after a failure with this code
    successes: int

    @property
    def success_rate(self) -> float:
        """Share of those retries that succeeded (NaN without any)."""
        return self.successes / self.support if self.support else math.nan

    def as_list(self) -> list[Any]:
        """The JSON form kept in bundle metadata: ``[connector, code, message, support, successes]``."""
        return [self.connector, self.code, self.message, self.support, self.successes]

    @classmethod
    def from_list(cls, row: Sequence[Any]) -> KnownCode:
        """Inverse of :meth:`as_list`."""
        connector, code, message, support, successes = row
        return cls(str(connector), str(code), None if message is None else str(message), int(support), int(successes))


def code_inventory(
    connectors: npt.ArrayLike,
    codes: npt.ArrayLike,
    messages: npt.ArrayLike,
    is_retry: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    limit: int = MAX_INVENTORY,
    weights: tuple[npt.ArrayLike, npt.ArrayLike, npt.ArrayLike] | None = None,
) -> list[list[Any]]:
    """Per (connector, error code) of the decision points a model is trained on: retries, successes, a message.

    Arguments are aligned per decision point (the failure's connector, code and message, whether the action was
    a silent retry, and its label). Codes with no retry are kept with support 0 (their text is still known).
    ``weights`` = (retries, successes, points) per row instead of one point each: rows that stand for counts
    (e.g. one row per distinct error of a large history; ``is_retry`` and ``labels`` are then ignored).
    Returns :meth:`KnownCode.as_list` rows, most-supported first, at most ``limit``.
    """
    retries: npt.ArrayLike
    successes: npt.ArrayLike
    points: npt.ArrayLike
    if weights is None:
        retry = np.asarray(is_retry, dtype=bool)
        retries, successes, points = retry, retry & np.asarray(labels, dtype=bool), np.ones(len(retry))
    else:
        retries, successes, points = weights
    frame = pd.DataFrame(
        {
            "connector": np.asarray(connectors, dtype=object),
            "code": np.asarray(codes, dtype=object),
            "message": np.asarray(messages, dtype=object),
            "retry": np.asarray(retries, dtype=np.float64),
            "success": np.asarray(successes, dtype=np.float64),
            "points": np.asarray(points, dtype=np.float64),
        }
    )
    frame = frame[frame["code"].notna() & frame["connector"].notna()]
    if frame.empty:
        return []
    frame["key"] = [code_key(c, k) for c, k in zip(frame["connector"], frame["code"], strict=True)]
    table = frame.groupby("key", sort=True).agg(
        connector=("connector", "first"),
        code=("code", "first"),
        support=("retry", "sum"),
        successes=("success", "sum"),
        points=("points", "sum"),
    )
    # The most frequent message of each code (ties: the first seen).
    counted = frame.dropna(subset=["message"]).groupby(["key", "message"], sort=False)["points"].sum()
    by_message = counted.reset_index().sort_values("points", ascending=False, kind="mergesort")
    table["message"] = by_message.drop_duplicates("key").set_index("key")["message"].reindex(table.index)
    table = table.sort_values(["support", "points"], ascending=False, kind="mergesort").head(limit)
    out: list[list[Any]] = []
    for connector, code, message, support, won in zip(
        table["connector"], table["code"], table["message"], table["support"], table["successes"], strict=True
    ):
        text = None if message is None or (isinstance(message, float) and math.isnan(message)) else str(message)
        out.append(KnownCode(str(connector), str(code), text, int(support), int(won)).as_list())
    return out


def inventory_of(metadata: Mapping[str, Any]) -> list[KnownCode] | None:
    """The known codes a bundle's metadata carries; None for a bundle trained before inventories existed."""
    rows = metadata.get(KNOWN_CODES_KEY)
    if rows is None:
        return None
    return [KnownCode.from_list(row) for row in rows]


def support_table(inventory: Sequence[KnownCode]) -> dict[str, int]:
    """``code_key -> support`` of an inventory."""
    return {code_key(entry.connector, entry.code): entry.support for entry in inventory}


# ----------------------------------------------------------------------------------------------------------------
# Nearest known codes by text


class _Vectorizer(Protocol):
    def transform(self, raw_documents: Sequence[str]) -> Any: ...


@dataclass(frozen=True)
class Neighbour:
    """A known code close to a new one in the text model's space."""

    connector: str
    code: str
    message: str | None
    similarity: float  # cosine similarity of the two documents' TF-IDF vectors
    support: int
    success_rate: float

    def describe(self) -> str:
        """Short form for tables: ``stripe/card_declined 0.82 (retry 12% of 340)``."""
        rate = "n/a" if math.isnan(self.success_rate) else f"{self.success_rate:.0%}"
        return f"{self.connector}/{self.code} {self.similarity:.2f} (retry {rate} of {self.support})"


def nearest_codes(
    vectorizer: _Vectorizer | None,
    inventory: Sequence[KnownCode],
    queries: Sequence[tuple[str | None, str | None, str | None]],
    *,
    k: int = 3,
    min_support: int = 1,
) -> list[list[Neighbour]]:
    """For each (connector, code, message) query, the ``k`` most similar inventory codes (cosine, TF-IDF).

    Only codes with at least ``min_support`` retries are candidates, and never the query's own code. The
    documents are built exactly as the text model builds them (``model.textmodel.document``).
    """
    from model.textmodel import document

    pool = [entry for entry in inventory if entry.support >= min_support]
    if vectorizer is None or not pool or not queries:
        return [[] for _ in queries]
    known = vectorizer.transform([document(e.connector, e.code, e.message) for e in pool])
    asked = vectorizer.transform([document(*query) for query in queries])
    # TF-IDF rows are L2-normalised, so the dot product is the cosine; normalise again in case a vectoriser isn't.
    similarity = np.asarray((asked @ known.T).todense(), dtype=np.float64)
    norms = np.sqrt(np.asarray(asked.multiply(asked).sum(axis=1), dtype=np.float64)).reshape(-1, 1)
    known_norms = np.sqrt(np.asarray(known.multiply(known).sum(axis=1), dtype=np.float64)).reshape(1, -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        similarity = np.nan_to_num(similarity / (norms * known_norms))
    out: list[list[Neighbour]] = []
    for row, (connector, code, _message) in enumerate(queries):
        own = code_key(connector, code)
        found: list[Neighbour] = []
        for j in np.argsort(-similarity[row], kind="stable"):
            entry = pool[int(j)]
            if code_key(entry.connector, entry.code) == own:
                continue
            found.append(
                Neighbour(
                    entry.connector,
                    entry.code,
                    entry.message,
                    float(similarity[row, int(j)]),
                    entry.support,
                    entry.success_rate,
                )
            )
            if len(found) == k:
                break
        out.append(found)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The report


#: Columns of :func:`new_codes_report`.
REPORT_COLUMNS: tuple[str, ...] = (
    "connector", "error_code", "example_message", "training_support", "failures", "orders", "retries",
    "retry_successes", "observed_retry_rate", "recovered_orders", "retry_probability", "retryable", "nearest",
)  # fmt: skip


def _outcomes(attempts: pd.DataFrame) -> pd.DataFrame:
    """Per code of the history's failed attempts: failures, orders, silent retries after it and their successes."""
    from model.vocab import RETRY_STRATEGIES

    silent = {s.value for s in RETRY_STRATEGIES}
    a = attempts.sort_values(["order_id", "attempt_number"], kind="mergesort").reset_index(drop=True)
    a["key"] = [code_key(c, k) for c, k in zip(a["connector"], a["error_code"], strict=True)]
    same_order = a["order_id"].shift(-1) == a["order_id"]
    nxt_strategy = a["strategy"].shift(-1).where(same_order)
    nxt_status = a["status"].shift(-1).where(same_order)
    failed = a["status"].astype(str) == "failure"
    a["retried"] = failed & nxt_strategy.isin(silent).to_numpy()
    a["retry_ok"] = a["retried"] & (nxt_status == "success").to_numpy()
    recovered = set(a.loc[a["status"].astype(str) == "success", "order_id"])
    a["recovered"] = a["order_id"].isin(recovered)
    f = a[failed & a["error_code"].notna()]
    if f.empty:
        return pd.DataFrame(columns=["key", "connector", "error_code", "example_message", "failures", "orders"])
    per_code = f.groupby("key", sort=False).agg(
        connector=("connector", "first"),
        error_code=("error_code", "first"),
        example_message=("error_message", lambda s: s.dropna().iloc[0] if s.notna().any() else None),
        failures=("order_id", "size"),
        orders=("order_id", "nunique"),
        retries=("retried", "sum"),
        retry_successes=("retry_ok", "sum"),
    )
    recovered_orders = f.drop_duplicates(["key", "order_id"]).groupby("key")["recovered"].sum()
    per_code["recovered_orders"] = recovered_orders.reindex(per_code.index).fillna(0).astype(int)
    return per_code.reset_index()


def typical_retry_probability(
    scorer: Any,
    attempts: pd.DataFrame,
    rows: Sequence[int],
    *,
    merchants: Mapping[str, Any] | None = None,
    catalog: ErrorCatalog | None = None,
) -> float:
    """The scorer's mean P(best permitted silent retry succeeds) over some failed attempts of a history.

    Each row (a position in ``attempts``) becomes the decision request a caller would send right after that
    failure; ``decide()`` without exploration answers it and its ``retry_probability`` is averaged. ``merchants``
    default to a permissive config per merchant whose pecking order is the history's connectors. ``catalog`` is the
    one the rules read (default: the shipped one); a registered version's is the one it was trained with.
    """
    from model.catalog import load_catalog
    from model.merchant_config import MerchantConfig
    from model.policy import PolicyConfig, decide
    from model.training import request_at

    if not rows:
        return math.nan
    catalog = load_catalog() if catalog is None else catalog
    config = PolicyConfig(exploration=0.0, exploration_rare_code=0.0)
    connectors = attempts["connector"].astype(str).value_counts().index.tolist()
    values = []
    rng = np.random.default_rng(0)
    # The estimate is for the failure itself, before any nudge: the request carries the attempts only.
    no_nudges = pd.DataFrame(columns=["order_id", "nudge_id", "sent_at", "channel", "delivered", "clicked_at"])
    for position in rows:
        row = attempts.iloc[int(position)]
        point = {
            "order_id": row["order_id"],
            "attempt_prefix": int(row["attempt_number"]),
            "nudge_prefix": 0,
            "decision_time": row["created_at"],
            "action_time": row["created_at"],
            "kind": "retry",
            "strategy": "retry_same",
            "target_connector": str(row["connector"]),
        }
        request, _ = request_at(attempts, no_nudges, point)
        merchant = (merchants or {}).get(request.merchant_id) or MerchantConfig(
            api_key_sha256="0" * 64, connectors=connectors
        )
        decision = decide(request, merchant, scorer, catalog=catalog, config=config, rng=rng)
        values.append(decision.retry_probability)
    return float(np.mean(values))


def new_codes_report(
    bundle: Any,
    attempts: pd.DataFrame,
    *,
    min_support: int = DEFAULT_MIN_SUPPORT,
    examples_per_code: int = 20,
    neighbours: int = 3,
    merchants: Mapping[str, Any] | None = None,
    catalog: ErrorCatalog | None = None,
) -> pd.DataFrame:
    """Codes of a history's failed attempts that ``bundle`` was trained on fewer than ``min_support`` times.

    One row per code (``REPORT_COLUMNS``), most frequent first: how often it failed and in how many orders,
    silent retries after it and their successes, orders recovered in the end, the bundle's retryability estimate
    for a typical failure with it (mean over up to ``examples_per_code`` of its most recent failures) and
    verdict, and the nearest known codes by text. ``bundle=None`` (no champion) treats every code as unseen and
    scores with the rules-only priors. ``catalog``: what its rules read (`typical_retry_probability`).
    """
    from model.policy import DEFAULT_RETRYABLE_THRESHOLD

    inventory = inventory_of(getattr(bundle, "metadata", {}) or {}) if bundle is not None else []
    support = support_table(inventory or [])
    per_code = _outcomes(attempts)
    if per_code.empty:
        return pd.DataFrame(columns=list(REPORT_COLUMNS))
    per_code["training_support"] = [support.get(key, 0) for key in per_code["key"]]
    per_code = per_code[per_code["training_support"] < min_support]
    per_code = per_code.sort_values(["failures", "key"], ascending=[False, True], kind="mergesort")
    if per_code.empty:
        return pd.DataFrame(columns=list(REPORT_COLUMNS))

    ordered = attempts.reset_index(drop=True)
    keys = pd.Series([code_key(c, k) for c, k in zip(ordered["connector"], ordered["error_code"], strict=True)])
    failed = (ordered["status"].astype(str) == "failure").to_numpy()
    stamps = pd.to_datetime(ordered["created_at"], utc=True)
    seconds = (stamps - stamps.min()).dt.total_seconds().to_numpy(dtype=np.float64)
    probabilities, verdicts = [], []
    threshold = DEFAULT_RETRYABLE_THRESHOLD if bundle is None else bundle.retryable_threshold
    for key in per_code["key"]:
        rows = np.flatnonzero(failed & (keys == key).to_numpy())
        rows = rows[np.argsort(-seconds[rows], kind="stable")][:examples_per_code]  # the most recent first
        p = typical_retry_probability(bundle, ordered, rows.tolist(), merchants=merchants, catalog=catalog)
        probabilities.append(p)
        verdicts.append(bool(p >= threshold) if not math.isnan(p) else False)
    per_code["retry_probability"] = probabilities
    per_code["retryable"] = verdicts
    text_model = getattr(bundle, "text_model", None)
    found = nearest_codes(
        getattr(text_model, "vectorizer", None),
        inventory or [],
        [
            (str(c), str(k), None if m is None or (isinstance(m, float) and math.isnan(m)) else str(m))
            for c, k, m in zip(per_code["connector"], per_code["error_code"], per_code["example_message"], strict=True)
        ],
        k=neighbours,
        min_support=max(1, min_support),
    )
    per_code["nearest"] = ["; ".join(n.describe() for n in near) for near in found]
    with np.errstate(divide="ignore", invalid="ignore"):
        per_code["observed_retry_rate"] = np.where(
            per_code["retries"] > 0, per_code["retry_successes"] / per_code["retries"].clip(lower=1), np.nan
        )
    out = per_code[list(REPORT_COLUMNS)].reset_index(drop=True)
    for column in ("failures", "orders", "retries", "retry_successes", "recovered_orders", "training_support"):
        out[column] = out[column].astype(int)
    return out

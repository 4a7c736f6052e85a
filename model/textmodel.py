"""What an error's text says about it, for error codes the catalog and the tree model have never seen.

Each distinct (connector, error code, message) becomes one document: the connector, the code, the code split
into words ("AUTH_DECLINED_LOW_BALANCE" -> "auth declined low balance") and the message. A char n-gram TF-IDF
(2-5, ``char_wb``) feeds two regularised logistic regressions: P(a silent retry of this error succeeds), and the
probabilities of the catalog's error classes. Their outputs are numeric features of the tree models
(``model.features.TEXT_COLUMNS``). Training fits them out-of-fold, grouped by error code (:func:`out_of_fold`), so
the trees never see a prediction made with the example's own code.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import sparse
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold

from model.features import TEXT_CLASSES, TEXT_COLUMNS

FloatArray = npt.NDArray[np.float64]

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SEPARATORS = re.compile(r"[^0-9A-Za-z]+")
#: Distinct documents kept in the serving cache before it is emptied (the vectoriser is slow per call).
CACHE_SIZE = 4096
#: Errors per vectoriser call when a cache is warmed with pauses between (a scorer loading a new version beside its
#: requests): ~1.2 ms each (0.6 ms a call, 0.04 ms an error), ~1.8x the CPU of one call for all; without pauses
#: (a worker's first load, the executor), all go through one call.
WARM_CHUNK = 16


def code_words(code: str | None) -> str:
    """An error code as lower-case words: ``"AUTH_DECLINED_LOW_BALANCE"`` -> ``"auth declined low balance"``."""
    if not code:
        return ""
    return " ".join(w for w in _SEPARATORS.split(_CAMEL.sub(" ", code)) if w).lower()


#: The model reads at most this many characters of each part of an error (providers' messages are a sentence or
#: two; char n-grams of a megabyte-long one took seconds of a worker's time).
MAX_PART_CHARS = 1000


def document(connector: str | None, code: str | None, message: str | None) -> str:
    """The text the model reads for one error (each part cut at ``MAX_PART_CHARS``), in training and serving."""
    code = (code or "")[:MAX_PART_CHARS]
    parts = ((connector or "")[:MAX_PART_CHARS], code, code_words(code), (message or "")[:MAX_PART_CHARS])
    return " ".join(p for p in parts if p).lower()


@dataclass(frozen=True)
class ErrorTexts:
    """Distinct errors with what was observed of them (the text model's training table)."""

    connectors: list[str | None]
    codes: list[str | None]
    messages: list[str | None]
    retry_successes: FloatArray  # silent retries of this error that succeeded
    retry_trials: FloatArray  # silent retries of this error
    classes: list[str | None]  # the catalog's class (None: unknown, not used as a label)

    def __len__(self) -> int:
        return len(self.codes)

    def subset(self, rows: npt.NDArray[np.intp]) -> ErrorTexts:
        """The table restricted to some rows."""
        pick = rows.tolist()
        return ErrorTexts(
            [self.connectors[i] for i in pick],
            [self.codes[i] for i in pick],
            [self.messages[i] for i in pick],
            self.retry_successes[rows],
            self.retry_trials[rows],
            [self.classes[i] for i in pick],
        )

    def groups(self) -> npt.NDArray[np.intp]:
        """Group id per row: one group per (connector, error code)."""
        index: dict[tuple[str | None, str | None], int] = {}
        return np.array(
            [index.setdefault((c, k), len(index)) for c, k in zip(self.connectors, self.codes, strict=True)],
            dtype=np.intp,
        )


@dataclass
class TextModel:
    """Char n-gram TF-IDF + logistic regressions; outputs ``TEXT_COLUMNS`` for any error text."""

    vectorizer: TfidfVectorizer | None
    retry_model: LogisticRegression | None
    class_model: LogisticRegression | None
    retry_prior: float
    class_prior: list[float]  # per TEXT_CLASSES, used when there is no class model
    _cache: dict[tuple[str | None, str | None, str | None], dict[str, float]] = field(
        default_factory=dict, repr=False, compare=False
    )

    @classmethod
    def fit(cls, table: ErrorTexts, *, seed: int = 0, c: float = 4.0) -> TextModel:
        """Fit on a table of distinct errors (retry outcomes as weighted positives and negatives)."""
        trials = float(table.retry_trials.sum())
        retry_prior = float(table.retry_successes.sum() / trials) if trials > 0 else math.nan
        labelled = [k for k in table.classes if k is not None]
        counts = np.array([labelled.count(k) for k in TEXT_CLASSES], dtype=np.float64)
        class_prior = (counts / counts.sum()).tolist() if counts.sum() > 0 else [0.0] * len(TEXT_CLASSES)
        if len(table) == 0:
            return cls(None, None, None, retry_prior, class_prior)

        vectorizer = TfidfVectorizer(
            analyzer="char_wb", ngram_range=(2, 5), min_df=1, sublinear_tf=True, max_features=1 << 12, dtype=np.float64
        )
        docs = [document(*t) for t in zip(table.connectors, table.codes, table.messages, strict=True)]
        matrix = vectorizer.fit_transform(docs)
        # The vocabulary's indexes as ints, not the numpy integers scikit-learn leaves after max_features: the
        # same columns, and a pickle a loading scorer reads in a third of the time (each numpy integer is an
        # object of its own to rebuild).
        vectorizer.vocabulary_ = {term: int(column) for term, column in vectorizer.vocabulary_.items()}

        retry_model: LogisticRegression | None = None
        failures = table.retry_trials - table.retry_successes
        if table.retry_successes.sum() > 0 and failures.sum() > 0:
            weights = np.concatenate([table.retry_successes, failures])
            keep = weights > 0
            stacked = sparse.vstack([matrix, matrix]).tocsr()[keep]
            labels = np.concatenate([np.ones(len(table)), np.zeros(len(table))])[keep]
            # Weights as shares of a unit per error, so a frequent code cannot drown the regularisation.
            share = weights[keep] / np.concatenate([table.retry_trials, table.retry_trials])[keep]
            retry_model = LogisticRegression(C=c, solver="newton-cg", max_iter=500, random_state=seed)
            retry_model.fit(stacked, labels, sample_weight=share)

        class_model: LogisticRegression | None = None
        rows = [i for i, k in enumerate(table.classes) if k is not None]
        if len({table.classes[i] for i in rows}) >= 2:
            class_model = LogisticRegression(C=c, solver="newton-cg", max_iter=500, random_state=seed)
            class_model.fit(matrix[rows], [table.classes[i] for i in rows])
        return cls(vectorizer, retry_model, class_model, retry_prior, class_prior)

    def predict(
        self,
        connectors: Sequence[str | None],
        codes: Sequence[str | None],
        messages: Sequence[str | None],
    ) -> dict[str, FloatArray]:
        """``TEXT_COLUMNS`` for each error (one vectoriser call for all rows)."""
        n = len(codes)
        out = {name: np.full(n, math.nan) for name in TEXT_COLUMNS}
        if n == 0:
            return out
        for j, name in enumerate(TEXT_COLUMNS[1:]):
            out[name][:] = self.class_prior[j]
        out["text_p_retry"][:] = self.retry_prior
        if self.vectorizer is None:
            return out
        docs = [document(*t) for t in zip(connectors, codes, messages, strict=True)]
        matrix = self.vectorizer.transform(docs)
        if self.retry_model is not None:
            out["text_p_retry"] = self.retry_model.predict_proba(matrix)[:, 1].astype(np.float64)
        if self.class_model is not None:
            probabilities = self.class_model.predict_proba(matrix)
            for name in TEXT_COLUMNS[1:]:
                out[name][:] = 0.0
            for j, label in enumerate(self.class_model.classes_):
                out[f"text_p_{label}"] = probabilities[:, j].astype(np.float64)
        return out

    def features_for(self, connector: str | None, code: str | None, message: str | None) -> dict[str, float]:
        """``TEXT_COLUMNS`` of one error, cached per distinct (connector, code, message)."""
        key = (connector, code, message)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        row = {name: float(values[0]) for name, values in self.predict([connector], [code], [message]).items()}
        if len(self._cache) >= CACHE_SIZE:
            self._cache.clear()
        self._cache[key] = row
        return row

    def cached_errors(self) -> list[tuple[str | None, str | None, str | None]]:
        """The (connector, code, message) of every error whose features are cached, oldest first."""
        return list(self._cache.copy())  # one C call: requests on other threads may be adding to it

    def warm(
        self,
        errors: Sequence[tuple[str | None, str | None, str | None]],
        *,
        between_steps: Callable[[], object] | None = None,
    ) -> None:
        """Cache the features of ``errors`` now (up to ``CACHE_SIZE`` of them, the last ones), so requests carrying
        them do not pay for it. With none, one error without code or message still goes through, so the
        vectoriser's and the classifiers' own first-call set-up is paid here, not by a request.

        With ``between_steps``, the errors go through the vectoriser ``WARM_CHUNK`` at a time, and it is called after
        each chunk: a scorer warming a new version up beside its requests lets them go first there
        (service/api/inflight.py)."""
        wanted = [error for error in dict.fromkeys(errors) if error not in self._cache][-CACHE_SIZE:] or [
            (None, None, None)
        ]
        rows: list[tuple[tuple[str | None, str | None, str | None], dict[str, float]]] = []
        chunk_size = len(wanted) if between_steps is None else WARM_CHUNK
        for start in range(0, len(wanted), chunk_size):
            chunk = wanted[start : start + chunk_size]
            connectors, codes, messages = (list(column) for column in zip(*chunk, strict=True))
            predicted = self.predict(connectors, codes, messages)
            rows.extend(
                (key, {name: float(values[row]) for name, values in predicted.items()}) for row, key in enumerate(chunk)
            )
            if between_steps is not None:
                between_steps()
        if len(self._cache) + len(wanted) > CACHE_SIZE:
            self._cache.clear()
        self._cache.update(rows)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state


def out_of_fold(table: ErrorTexts, *, n_splits: int = 5, seed: int = 0) -> dict[str, FloatArray]:
    """``TEXT_COLUMNS`` per row of ``table``, each predicted by a model fitted without that row's error code."""
    groups = table.groups()
    n_groups = len(set(groups.tolist()))
    out = {name: np.full(len(table), math.nan) for name in TEXT_COLUMNS}
    if n_groups < 2:
        # Nothing to hold out against: only the priors are honest.
        full = TextModel.fit(table, seed=seed)
        priors = TextModel(None, None, None, full.retry_prior, full.class_prior)
        return priors.predict(table.connectors, table.codes, table.messages)
    splitter = GroupKFold(n_splits=min(n_splits, n_groups))
    for train_rows, test_rows in splitter.split(np.zeros(len(table)), groups=groups):
        model = TextModel.fit(table.subset(train_rows), seed=seed)
        test = table.subset(test_rows)
        predicted = model.predict(test.connectors, test.codes, test.messages)
        for name in TEXT_COLUMNS:
            out[name][test_rows] = predicted[name]
    return out

"""What an error's text says about it, for error codes the catalog and the tree model have never seen.

Each distinct (connector, error code, message) becomes one document: the connector, the code, the code split
into words ("AUTH_DECLINED_LOW_BALANCE" -> "auth declined low balance") and the message. A char n-gram TF-IDF
(2-5, ``char_wb``) feeds two regularised logistic regressions: P(a silent retry of this error succeeds), and the
probabilities of the catalog's error classes. Their outputs are numeric features of the tree models
(``model.features.TEXT_COLUMNS``). Training fits them out-of-fold, grouped by error code (:func:`out_of_fold`), so
the trees never see a prediction made with the example's own code.

A request's never-seen error (up to ``DIRECT_ROWS`` errors a call) is computed without scikit-learn's per-call
checks, by ``_DirectText``: the same floats, bit for bit.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import operator
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import sparse
from scipy.special import expit
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold
from sklearn.utils.extmath import softmax

from model.catalog import memo_worthy
from model.features import TEXT_CLASSES, TEXT_COLUMNS
from model.personal_data import mask_addresses_in

FloatArray = npt.NDArray[np.float64]

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SEPARATORS = re.compile(r"[^0-9A-Za-z]+")
#: Distinct documents kept in the serving cache before it is emptied (the vectoriser is slow per call).
CACHE_SIZE = 4096
#: Errors per ``predict`` call when a cache is warmed with pauses between (a scorer loading a new version beside its
#: requests): ~1.2 ms each (0.6 ms a call, 0.04 ms an error), ~1.8x the CPU of one call for all; without pauses
#: (a worker's first load, the executor), all go through one call.
WARM_CHUNK = 16
#: Up to this many errors, ``TextModel.predict`` computes them one by one on plain arrays (``_DirectText``, the same
#: floats, ~0.2 ms an error) instead of through scikit-learn, whose checks cost ~0.6 ms a call but whose one call
#: then takes ~0.05 ms an error more: a request's new error goes the direct way, a warm-up's chunks and training's
#: thousands through scikit-learn.
DIRECT_ROWS = 4
#: Words up to this long keep their n-grams' columns in ``_DirectText``'s word cache; longer ones (references,
#: hashes, a message without spaces) rarely come back and would fill it.
CACHED_WORD_CHARS = 40
#: Columns (one per n-gram occurrence) the word cache holds in all before it is emptied: ~8 bytes each, a few MB.
WORD_CACHE_COLUMNS = 1 << 19
#: Rows of a doc's terms multiplied and summed per numpy call in ``_DirectText``: with 14 scores, ~450 numbers a
#: call. Above ~500, numpy lets the GIL go for the call and takes it back after, and a loading thread doing that
#: over and over starves a request waiting for the GIL (the swap probe saw its wait at p90 go from 0.3 to 2 ms).
_NUMPY_CALL_NUMBERS = 480

log = logging.getLogger("winback.model")


def code_words(code: str | None) -> str:
    """An error code as lower-case words: ``"AUTH_DECLINED_LOW_BALANCE"`` -> ``"auth declined low balance"``."""
    if not code:
        return ""
    return " ".join(w for w in _SEPARATORS.split(_CAMEL.sub(" ", code)) if w).lower()


#: The model reads at most this many characters of each part of an error (providers' messages are a sentence or
#: two; char n-grams of a megabyte-long one took seconds of a worker's time).
MAX_PART_CHARS = 1000
#: How much of a message ``document`` masks before it cuts it at ``MAX_PART_CHARS``.
MASK_WINDOW_CHARS = 4 * MAX_PART_CHARS


def document(connector: str | None, code: str | None, message: str | None) -> str:
    """The text the model reads for one error (each part cut at ``MAX_PART_CHARS``), in training and serving.

    The message's e-mail addresses and phone numbers are masked first (``mask_addresses_in``, before the cut, so the
    cut falls where it falls in a masked text): the history files the model trains on hold decline texts masked
    (``winback history export``, the stores' masked columns), while a request's failure, and an order's in the
    executor, carry the connector's text as sent. Masked here, both give the model the same text (masking a masked
    text changes nothing), whatever the path. A text with neither is read as it was (the catalog's messages, most
    decline texts). Serving runs this only for an error not in ``TextModel``'s cache: once per distinct error (each
    time for one too long to cache, as it runs the n-grams)."""
    code = (code or "")[:MAX_PART_CHARS]
    # Masked within a bound: a request's message may be megabytes, masked on each request when too long to cache.
    # Masking changes an address's length by a character at most (e-mails shrink), so the first MAX_PART_CHARS of the
    # masked bound are those of the masked whole (training's text) unless the bound is nearly all addresses.
    text = mask_addresses_in((message or "")[:MASK_WINDOW_CHARS])[:MAX_PART_CHARS]
    parts = ((connector or "")[:MAX_PART_CHARS], code, code_words(code), text)
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
    #: The direct form of the fitted vectoriser and regressions (None: not built yet; False: not available). Not an
    #: argument: a copy made with other regressions (``dataclasses.replace``) must build its own.
    _direct: _DirectText | bool | None = field(default=None, init=False, repr=False, compare=False)

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
        direct = self._direct_form() if n <= DIRECT_ROWS else None
        if direct is not None:
            p_retry, probabilities = direct.predict(docs)
        else:
            matrix = self.vectorizer.transform(docs)
            p_retry = None if self.retry_model is None else self.retry_model.predict_proba(matrix)[:, 1]
            probabilities = None if self.class_model is None else self.class_model.predict_proba(matrix)
        if p_retry is not None:
            out["text_p_retry"] = p_retry.astype(np.float64)
        if probabilities is not None and self.class_model is not None:
            for name in TEXT_COLUMNS[1:]:
                out[name][:] = 0.0
            for j, label in enumerate(self.class_model.classes_):
                out[f"text_p_{label}"] = probabilities[:, j].astype(np.float64)
        return out

    def _direct_form(self, *, checked: bool = False) -> _DirectText | None:
        """The direct form of this model (built once), or None where it cannot give scikit-learn's floats. ``checked``:
        it was built and checked against scikit-learn for this very model with these very libraries elsewhere (another
        worker of the server), and is not checked again."""
        if self._direct is None:
            self._direct = _DirectText.of(self, checked=checked) or False
        return self._direct if isinstance(self._direct, _DirectText) else None

    def features_for(self, connector: str | None, code: str | None, message: str | None) -> dict[str, float]:
        """``TEXT_COLUMNS`` of one error, cached per distinct (connector, code, message)."""
        key = (connector, code, message)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        row = {name: float(values[0]) for name, values in self.predict([connector], [code], [message]).items()}
        if not memo_worthy(connector, code, message):
            return row
        if len(self._cache) >= CACHE_SIZE:
            self._cache.clear()
        self._cache[key] = row
        return row

    def cached_errors(self) -> list[tuple[str | None, str | None, str | None]]:
        """The (connector, code, message) of every error whose features are cached, oldest first."""
        return list(self._cache.copy())  # one C call: requests on other threads may be adding to it

    def has_direct_form(self) -> bool:
        """Whether the direct form was built (and checked) and computes this model's features."""
        return isinstance(self._direct, _DirectText)

    def warmed_rows(self) -> dict[str, list[float]]:
        """The cached features of every error, ``TEXT_COLUMNS`` in order, keyed by ``error_digest`` (what another
        process warming the same model passes to ``warm`` as ``known``)."""
        return {error_digest(key): [row[name] for name in TEXT_COLUMNS] for key, row in self._cache.copy().items()}

    def warm(
        self,
        errors: Sequence[tuple[str | None, str | None, str | None]],
        *,
        between_steps: Callable[[], object] | None = None,
        known: Mapping[str, Sequence[float]] | None = None,
        direct_form_checked: bool = False,
    ) -> None:
        """Cache the features of ``errors`` now (up to ``CACHE_SIZE`` of them, the last ones), so requests carrying
        them do not pay for it. With none, one error without code or message still goes through, so the
        vectoriser's and the classifiers' own first-call set-up is paid here, not by a request.

        With ``between_steps``, the errors go through the vectoriser ``WARM_CHUNK`` at a time, and it is called after
        each chunk: a scorer warming a new version up beside its requests lets them go first there
        (service/api/inflight.py).

        ``known``: features of this very model computed elsewhere (``warmed_rows`` of another process), taken as
        they are for the errors they cover instead of computed again; ``direct_form_checked``: that process checked
        the direct form against scikit-learn with the same libraries (``_direct_form``'s ``checked``)."""
        # Built (and checked against scikit-learn) here, not by the first request with a new error.
        self._direct_form(checked=direct_form_checked)
        wanted = [error for error in dict.fromkeys(errors) if error not in self._cache][-CACHE_SIZE:] or [
            (None, None, None)
        ]
        rows: list[tuple[tuple[str | None, str | None, str | None], dict[str, float]]] = []
        if known:
            computed = []
            for error in wanted:
                row = known.get(error_digest(error))
                if row is not None and len(row) == len(TEXT_COLUMNS):
                    rows.append((error, {name: float(value) for name, value in zip(TEXT_COLUMNS, row, strict=True)}))
                else:
                    computed.append(error)
            wanted = computed
        chunk_size = max(len(wanted), 1) if between_steps is None else WARM_CHUNK
        for start in range(0, len(wanted), chunk_size):
            chunk = wanted[start : start + chunk_size]
            connectors, codes, messages = (list(column) for column in zip(*chunk, strict=True))
            predicted = self.predict(connectors, codes, messages)
            rows.extend(
                (key, {name: float(values[row]) for name, values in predicted.items()}) for row, key in enumerate(chunk)
            )
            if between_steps is not None:
                between_steps()
        if len(self._cache) + len(rows) > CACHE_SIZE:
            self._cache.clear()
        self._cache.update(rows)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = {}
        state["_direct"] = None
        return state


def direct_form_libraries() -> dict[str, str]:
    """The versions of the libraries whose floats the direct form's check compares (``_DirectText.of``): a check
    passed with the same ones holds for another process of the same installation."""
    import scipy
    import sklearn

    return {"numpy": np.__version__, "scipy": scipy.__version__, "scikit-learn": sklearn.__version__}


def error_digest(error: tuple[str | None, str | None, str | None]) -> str:
    """A key of an error (connector, code, message) that does not hold its text: a file of warmed features
    (``TextModel.warmed_rows``) must not keep the messages requests carried."""
    # repr, not JSON: one C call per error (a tuple of strings and None reads back one way only).
    return hashlib.sha256(repr(error).encode()).hexdigest()


class _DirectText:
    """A fitted ``TextModel``'s vectoriser and regressions as plain numpy arrays: the same floats as scikit-learn's
    ``transform`` and ``predict_proba`` (checked when built, and by tests), for one request's error in ~0.2 ms
    instead of ~0.7 ms.

    What scikit-learn does per call besides the arithmetic (input validation, a sparse matrix, its sorting) costs
    more than the arithmetic for a handful of errors. Here each step is the one scikit-learn takes, in its order:
    the ``char_wb`` n-grams of each word (looked up once per distinct word: n-grams never cross words), their
    counts in column order, ``1 + log`` of each count times its column's idf, each row divided by its L2 norm,
    then each regression's scores. scikit-learn's sparse code sums a row's terms one after another in column
    order, and so do the sums here (not numpy's pairwise ones): the same rounding, so byte-identical outputs. The
    probabilities go through the very functions scikit-learn uses (``expit``, ``softmax``). A numpy release that
    summed otherwise would fail the check made when the form is built, and scikit-learn would compute as before.
    """

    def __init__(self, model: TextModel) -> None:
        vectorizer, retry, classes = model.vectorizer, model.retry_model, model.class_model
        assert vectorizer is not None
        self.vocabulary: dict[str, int] = vectorizer.vocabulary_
        self.min_n, self.max_n = vectorizer.ngram_range
        self.preprocess = vectorizer.build_preprocessor()
        # Both regressions' coefficients, one score per column: the retry model's first (when there is one), then
        # the class model's; and where the class model's scores start.
        score_rows: list[npt.NDArray[np.float64]] = []
        intercepts: list[npt.NDArray[np.float64]] = []
        for regression in (retry, classes):
            if regression is not None:
                score_rows.append(np.asarray(regression.coef_, dtype=np.float64))
                intercepts.append(np.asarray(regression.intercept_, dtype=np.float64))
        # As (columns x scores), C-ordered, with a column of zeros when there is a single score (numpy adds a single
        # column's values pairwise, not one after another).
        if len(score_rows) == 1 and score_rows[0].shape[0] == 1:
            score_rows.append(np.zeros_like(score_rows[0]))
        self.weights = np.ascontiguousarray(np.concatenate(score_rows, axis=0).T) if score_rows else None
        self.intercepts = np.concatenate(intercepts) if intercepts else None
        self.retry_width = 0 if retry is None else retry.coef_.shape[0]
        self.class_binary = classes is not None and len(classes.classes_) <= 2
        self.has_retry, self.has_classes = retry is not None, classes is not None
        # Per column, as Python floats and as row views: looked up in Python, since numpy's fancy indexing lets the
        # GIL go now and then (``_NUMPY_CALL_NUMBERS``).
        self.idf_values: list[float] = np.asarray(vectorizer.idf_, dtype=np.float64).tolist()
        self.weight_rows: list[npt.NDArray[np.float64]] = [] if self.weights is None else list(self.weights)
        self.words: dict[str, tuple[int, ...]] = {}
        self.word_columns = 0  # columns held in ``words``

    @classmethod
    def of(cls, model: TextModel, *, checked: bool = False) -> _DirectText | None:
        """The direct form of ``model``, or None when its settings are not the ones reproduced here or a check
        against scikit-learn on sample errors differs (a scikit-learn release that computes otherwise); ``checked``:
        that check passed elsewhere for this model and these libraries, and is not made again."""
        vectorizer = model.vectorizer
        if vectorizer is None or not hasattr(vectorizer, "idf_"):
            return None
        settings = vectorizer.get_params()
        expected = {
            "analyzer": "char_wb", "input": "content", "lowercase": True, "strip_accents": None,
            "preprocessor": None, "binary": False, "use_idf": True, "sublinear_tf": True, "norm": "l2",
            "dtype": np.float64,
        }  # fmt: skip
        if any(settings.get(name) != value for name, value in expected.items()):
            return None
        for regression in (model.retry_model, model.class_model):
            if regression is not None and (len(regression.classes_) < 2 or regression.coef_.ndim != 2):
                return None
        if model.retry_model is not None and len(model.retry_model.classes_) != 2:
            return None
        direct = cls(model)
        if checked:
            return direct
        samples = [
            document("stripe", "card_declined", "Your card was declined."),
            document(None, None, None),
            document("adyen", "Refused", "Not enough balance\t on  the ÇARD 12345, try again later!"),
            document("x", "ÿ", "a"),
            document("razorpay", "BAD_REQUEST", "Limit exceeded\xa0for\u2003this\tcard\nİSTANBUL ẞ ǅ"),
            document("stripe", "do_not_honor", " ".join(f"word{i} declined" for i in range(25))),
        ]
        if not direct.same_as_sklearn(model, samples):
            log.warning("the text model's direct form differs from scikit-learn's; scikit-learn computes it")
            return None
        return direct

    def same_as_sklearn(self, model: TextModel, docs: list[str]) -> bool:
        """Whether ``predict(docs)`` gives scikit-learn's floats, bit for bit."""
        assert model.vectorizer is not None
        p_retry, probabilities = self.predict(docs)
        matrix = model.vectorizer.transform(docs)
        if model.retry_model is not None and (
            p_retry is None or not np.array_equal(p_retry, model.retry_model.predict_proba(matrix)[:, 1])
        ):
            return False
        return model.class_model is None or (
            probabilities is not None and np.array_equal(probabilities, model.class_model.predict_proba(matrix))
        )

    def _columns_of(self, word: str) -> tuple[int, ...]:
        """The vocabulary columns of a word's n-grams, one per occurrence (scikit-learn's ``_char_wb_ngrams``)."""
        padded = " " + word + " "
        length = len(padded)
        vocabulary = self.vocabulary
        found: list[int] = []
        for n in range(self.min_n, self.max_n + 1):
            offset = 0
            column = vocabulary.get(padded[:n])
            if column is not None:
                found.append(column)
            while offset + n < length:
                offset += 1
                column = vocabulary.get(padded[offset : offset + n])
                if column is not None:
                    found.append(column)
            if offset == 0:  # a word shorter than n counts once
                break
        return tuple(found)

    def _word_columns(self, word: str) -> tuple[int, ...]:
        """``_columns_of(word)``, from the word cache for a word of up to ``CACHED_WORD_CHARS``."""
        columns = self.words.get(word)
        if columns is None:
            columns = self._columns_of(word)
            if len(word) <= CACHED_WORD_CHARS:
                if self.word_columns + len(columns) > WORD_CACHE_COLUMNS:
                    self.words.clear()  # another thread may count a word of the old cache here: a bound, not a tally
                    self.word_columns = 0
                self.words[word] = columns
                self.word_columns += len(columns)
        return columns

    def predict(self, docs: Sequence[str]) -> tuple[FloatArray | None, FloatArray | None]:
        """P(retry succeeds) per doc, and the class probabilities per doc (rows x classes); None for a model the
        text model lacks."""
        if self.weights is None or self.intercepts is None:
            return None, None
        # One doc per call (~0.2 ms): a load building the form (its check against scikit-learn) gives way to requests
        # at calls (service/api/inflight.py).
        scores = np.array([self._scores(doc) for doc in docs], dtype=np.float64).reshape(len(docs), -1)
        scores = scores[:, : len(self.intercepts)] + self.intercepts  # without the zeros a single score has beside
        p_retry = expit(scores[:, 0]) if self.has_retry else None
        probabilities = None
        if self.has_classes:
            class_scores = np.ascontiguousarray(scores[:, self.retry_width :])
            if self.class_binary:
                positive = expit(class_scores[:, 0])
                probabilities = np.stack([1 - positive, positive], axis=1)
            else:
                probabilities = softmax(class_scores, copy=False)
        return p_retry, probabilities

    def _scores(self, doc: str) -> FloatArray:
        """The regressions' scores of one doc, before their intercepts (scikit-learn's sparse dot product).

        The terms are counted and the columns looked up in Python, and each numpy call takes at most
        ``_NUMPY_CALL_NUMBERS`` numbers, so none lets the GIL go (``np.unique``, ``np.bincount``, fancy indexing and
        larger arrays did: see ``_NUMPY_CALL_NUMBERS``)."""
        assert self.weights is not None
        counts: Counter[int] = Counter()
        for word in self.preprocess(doc).split():
            counts.update(self._word_columns(word))
        width = self.weights.shape[1]
        if not counts:
            return np.zeros(width, dtype=np.float64)
        columns = sorted(counts)  # in column order, as a CSR row
        values = np.array([counts[column] for column in columns], dtype=np.float64)
        idf, weight_rows = self.idf_values, self.weight_rows
        block = _NUMPY_CALL_NUMBERS
        for start in range(0, len(columns), block):
            part = values[start : start + block]
            np.log(part, part)
            part += 1.0
            part *= np.array([idf[column] for column in columns[start : start + block]], dtype=np.float64)
        # Sums in column order, one term after another, as scikit-learn's: the squares' in plain Python (numpy's
        # sum of a row is pairwise), the scores' as numpy's sum down the rows of a C-ordered block with the running
        # sum as its first row, which adds row after row.
        norm = math.sqrt(functools.reduce(operator.add, [value * value for value in values.tolist()], 0.0))
        for start in range(0, len(columns), block):
            values[start : start + block] /= norm  # not 0: every value is at least 1
        scores = np.zeros((1, width), dtype=np.float64)
        rows = max(1, block // width - 1)
        for start in range(0, len(columns), rows):
            weights = np.array([weight_rows[column] for column in columns[start : start + rows]], dtype=np.float64)
            terms = values[start : start + rows, None] * weights
            scores = np.add.reduce(np.concatenate((scores, terms)), axis=0, keepdims=True)
        row: FloatArray = scores[0]
        return row


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

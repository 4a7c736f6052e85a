"""The model bundle: everything a scorer needs, travelling together, saved as plain files.

``ModelBundle`` holds the feature spec, the text model, the retry and retarget LightGBM boosters with their
calibrators, the retryability threshold, metrics, the catalog version and training metadata. It scores candidate
actions for a decision request (:meth:`ModelBundle.score`) with one model call per model, from numpy only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import pickle
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Any, Literal

import joblib
import lightgbm as lgb
import numpy as np
import numpy.typing as npt

from model.catalog import ErrorCatalog, MemoCatalog, load_catalog
from model.cellsupport import CELL_SUPPORT_KEY, CellSupport
from model.codelevel import CODE_LEVEL_KEY, CodeLevels
from model.codewatch import code_key, inventory_of, support_table
from model.explanations import category_evidence, number_evidence, with_direction
from model.fastpredict import SINGLE_ROW_LIMIT, fast_predictor, kept_on_booster
from model.features import (
    MISSING,
    OTHER_CODE,
    FeatureSpec,
    context_from_request,
)
from model.policy import DEFAULT_RETRYABLE_THRESHOLD
from model.requests import DecisionRequest
from model.rules import Candidate
from model.textmodel import TextModel
from model.vocab import Action

FloatArray = npt.NDArray[np.float64]
FORMAT_VERSION = 1
_FILES = {
    "meta": "bundle.json",
    "spec": "feature_spec.json",
    "retry": "retry_model.txt",
    "retarget": "retarget_model.txt",
    "text": "text_model.pkl",
}
#: The text model as the releases before ``text_model.pkl`` wrote and read it (still written, for a scorer rolled
#: back): joblib's pure-Python unpickler takes ~12 ms of Python in a worker loading it beside its requests, against
#: ~1 ms for the same model through ``pickle``; read only from a bundle without ``text_model.pkl``.
_JOBLIB_TEXT_FILE = "text_model.joblib"
#: Each booster's explanation path table, derived from it when the bundle is saved, so a loading scorer reads a
#: few arrays instead of building the table in Python (~20 ms for both). Optional: a bundle saved before them, or
#: one whose table cannot be used (unreadable, or derived from another booster file), builds it from the booster.
_PATH_FILES = {"retry": "retry_paths.npz", "retarget": "retarget_paths.npz"}
log = logging.getLogger("winback.model")
#: Distinct catalog inputs remembered by a bundle's normalisation cache before it is emptied.
_CATALOG_CACHE_SIZE = 4096
#: Isotonic calibration is a step function; this slope of the raw score keeps candidates that share a step in the
#: booster's order, so the policy can still tell them apart. It moves a probability by at most 1e-6.
_TIE_BREAK = 1e-6
#: Fewest calibration examples behind each step of an isotonic calibrator. Isotonic regression gives the extreme
#: raw scores steps of their own however few they are: a champion served P = 1.0 to retries above one raw score
#: and 0.5 to payment links above another (observed: 1 in 9) from a handful of calibration examples each.
MIN_ISOTONIC_BLOCK = 50


def _platt_beats_identity(logit: FloatArray, labels: FloatArray, weights: FloatArray | None, folds: int = 5) -> bool:
    """Whether Platt scaling has a lower out-of-fold (weighted) log loss than the booster's own probabilities."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    if min(int(labels.sum()), int(len(labels) - labels.sum())) < folds:
        return False
    raw = 1.0 / (1.0 + np.exp(-logit[:, 0]))
    w = np.ones(len(labels)) if weights is None else np.asarray(weights, dtype=np.float64)
    platt_loss = identity_loss = 0.0
    for train, test in StratifiedKFold(n_splits=folds, shuffle=True, random_state=0).split(logit, labels):
        model = LogisticRegression(C=1e4, max_iter=1000)
        model.fit(logit[train], labels[train], sample_weight=w[train])
        y = labels[test]
        for p, which in ((model.predict_proba(logit[test])[:, 1], "platt"), (raw[test], "identity")):
            q = np.clip(p, 1e-6, 1 - 1e-6)
            loss = float(-(w[test] * (y * np.log(q) + (1 - y) * np.log(1 - q))).sum())
            if which == "platt":
                platt_loss += loss
            else:
                identity_loss += loss
    return platt_loss < identity_loss


@dataclass(frozen=True)
class Calibrator:
    """Maps a booster's raw probability to a calibrated one: isotonic (piecewise linear) or Platt (logistic)."""

    kind: Literal["isotonic", "platt", "identity"]
    x: tuple[float, ...] = ()
    y: tuple[float, ...] = ()
    a: float = 1.0
    b: float = 0.0

    @classmethod
    def fit(
        cls, raw: FloatArray, labels: FloatArray, weights: FloatArray | None = None, *, min_isotonic: int = 1000
    ) -> Calibrator:
        """Isotonic regression with at least ``min_isotonic`` examples, Platt scaling below (identity if one class)."""
        from sklearn.isotonic import IsotonicRegression
        from sklearn.linear_model import LogisticRegression

        raw = np.asarray(raw, dtype=np.float64)
        labels = np.asarray(labels, dtype=np.float64)
        if len(raw) == 0 or len(np.unique(labels)) < 2:
            return cls("identity")
        if len(raw) >= min_isotonic:
            iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
            iso.fit(raw, labels, sample_weight=weights)
            x, y = _pooled_steps(raw, labels, weights, iso.predict(raw), MIN_ISOTONIC_BLOCK)
            return cls("isotonic", x=x, y=y)
        logit = _logit(raw).reshape(-1, 1)
        platt = LogisticRegression(C=1e4, max_iter=1000)
        platt.fit(logit, labels, sample_weight=weights)
        if platt.coef_[0, 0] <= 0.0:
            # A calibrator must never reverse the booster's ranking: a non-positive slope means the calibration
            # slice holds no usable signal (seen on small histories), so the booster's own probabilities stand.
            return cls("identity")
        if not _platt_beats_identity(logit, labels, weights):
            # On a small slice an unregularised Platt fit can land on extreme slopes (seen: a = 8.5, which
            # turned a 27% base rate into a 5% mean prediction); keep it only where it wins out of sample.
            return cls("identity")
        return cls("platt", a=float(platt.coef_[0, 0]), b=float(platt.intercept_[0]))

    def __call__(self, raw: npt.ArrayLike) -> FloatArray:
        """Calibrated probabilities in [0, 1]."""
        p = np.asarray(raw, dtype=np.float64)
        if self.kind == "isotonic":
            x, y = self._thresholds
            out = np.interp(p, x, y) + _TIE_BREAK * p
        elif self.kind == "platt":
            out = 1.0 / (1.0 + np.exp(-(self.a * _logit(p) + self.b)))
        else:
            out = p
        return np.minimum(np.maximum(out, 0.0), 1.0)  # np.clip's dispatch costs more than the two ufuncs

    @cached_property
    def _thresholds(self) -> tuple[FloatArray, FloatArray]:
        # Converted once: an isotonic fit keeps thousands of thresholds, and np.interp on tuples would convert
        # them again on every request.
        return np.asarray(self.x, dtype=np.float64), np.asarray(self.y, dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"kind": self.kind, "x": list(self.x), "y": list(self.y), "a": self.a, "b": self.b}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Calibrator:
        """Inverse of :meth:`to_dict`."""
        kind = data["kind"]
        if kind not in ("isotonic", "platt", "identity"):
            raise ValueError(f"unknown calibrator kind {kind!r}")
        return cls(kind, tuple(data["x"]), tuple(data["y"]), float(data["a"]), float(data["b"]))


def _pooled_steps(
    raw: FloatArray, labels: FloatArray, weights: FloatArray | None, fitted: FloatArray, min_count: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The thresholds (x, y) of an isotonic fit whose steps each hold at least ``min_count`` examples.

    A step with fewer is pooled with the neighbour closer in value (its value the weighted mean label of both), as
    often as needed; pooling adjacent steps of a non-decreasing fit keeps it non-decreasing. Each step becomes its
    lowest and highest raw score at its value, with straight lines between steps, as scikit-learn's thresholds.
    """
    order = np.argsort(raw, kind="mergesort")
    xs, ys, fs = raw[order], labels[order], fitted[order]
    ws = np.ones(len(xs)) if weights is None else np.asarray(weights, dtype=np.float64)[order]
    # Steps: runs of one fitted value over distinct raw scores (equal raw scores always share a step).
    starts = [0] + [i for i in range(1, len(xs)) if fs[i] != fs[i - 1] and xs[i] != xs[i - 1]]
    steps = [[a, b] for a, b in zip(starts, [*starts[1:], len(xs)], strict=True)]

    def value(step: list[int]) -> float:
        w = ws[step[0] : step[1]]
        return float(np.dot(w, ys[step[0] : step[1]]) / w.sum()) if w.sum() > 0 else float(fs[step[0]])

    values = [value(step) for step in steps]
    while len(steps) > 1:
        sizes = [b - a for a, b in steps]
        small = int(np.argmin(sizes))
        if sizes[small] >= min_count:
            break
        if small == 0:
            other = 1
        elif small == len(steps) - 1:
            other = small - 1
        else:
            left, right = abs(values[small] - values[small - 1]), abs(values[small + 1] - values[small])
            other = small - 1 if left <= right else small + 1
        first, second = min(small, other), max(small, other)
        steps[first : second + 1] = [[steps[first][0], steps[second][1]]]
        values[first : second + 1] = [value(steps[first])]
    x: list[float] = []
    y: list[float] = []
    for (a, b), v in zip(steps, values, strict=True):
        for edge in (float(xs[a]), float(xs[b - 1])):
            if not x or edge > x[-1]:
                x.append(edge)
                y.append(min(max(v, 0.0), 1.0))
    return tuple(x), tuple(y)


def _logit(p: FloatArray) -> FloatArray:
    q = np.clip(p, 1e-6, 1 - 1e-6)
    return np.asarray(np.log(q / (1 - q)), dtype=np.float64)


class _MatrixMemo:
    """The last request's matrix and its candidates (held, so their ids cannot be reused while it lives)."""

    __slots__ = ("_rows", "candidates", "request", "x")

    def __init__(self, request: DecisionRequest, candidates: list[Candidate], x: npt.NDArray[np.float32]) -> None:
        self.request = request
        self.candidates = candidates
        self.x = x
        self._rows: dict[int, int] | None = None

    def rows_of(self, wanted: Sequence[Candidate]) -> list[int] | None:
        """The rows of ``wanted`` (the same objects), or None when one of them is not among the candidates."""
        if len(wanted) == 1:
            # explain()'s one candidate: a scan, instead of indexing every candidate of every request by id.
            target = wanted[0]
            return next(([row] for row, candidate in enumerate(self.candidates) if candidate is target), None)
        if self._rows is None:
            self._rows = {id(candidate): row for row, candidate in enumerate(self.candidates)}
        found = [self._rows.get(id(candidate)) for candidate in wanted]
        return None if any(row is None for row in found) else [row for row in found if row is not None]


@dataclass
class ModelBundle:
    """A trained winback model: feature spec, text model, boosters, calibrators, threshold and metadata."""

    spec: FeatureSpec
    text_model: TextModel
    retry_booster: lgb.Booster
    retarget_booster: lgb.Booster | None
    retry_calibrator: Calibrator
    retarget_calibrator: Calibrator | None
    #: decide()'s ``retryable`` verdict: the best retry the error allows reaches this P(success) (chosen by the
    #: training job, model.training.fit_retryable_threshold).
    retryable_threshold: float
    metrics: dict[str, float]
    catalog_version: str
    metadata: dict[str, Any]
    version: str
    catalog: ErrorCatalog | None = field(default=None, repr=False, compare=False)
    _normaliser: MemoCatalog | None = field(default=None, repr=False, compare=False)
    _memo: threading.local = field(default_factory=threading.local, repr=False, compare=False)
    _support: dict[str, int] | None = field(default=None, repr=False, compare=False)
    _cells: CellSupport | None = field(default=None, repr=False, compare=False)
    _levels: CodeLevels | None = field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------------------------------------------ scoring

    def use_catalog(self, catalog: ErrorCatalog) -> None:
        """Read the error catalog's verdicts from ``catalog`` from now on (the one the caller's rules read, e.g. the
        API's with its gateway status map overlay): a code only it knows is then known to the features too. Called
        at load time, before the bundle serves; what was remembered with the catalog before (its normalisations,
        each thread's last matrix) is dropped."""
        self.catalog = catalog
        self._normaliser = None
        self._memo = threading.local()

    def _catalog(self) -> MemoCatalog:
        if self._normaliser is None:
            inner = load_catalog() if self.catalog is None else self.catalog
            self._normaliser = MemoCatalog(inner, _CATALOG_CACHE_SIZE)
        return self._normaliser

    def context(self, request: DecisionRequest) -> dict[str, Any]:
        """The raw context columns of a request, text model outputs included (cached per distinct error)."""
        context = context_from_request(request, self._catalog())
        failure = request.failure
        context.update(self.text_model.features_for(failure.connector, failure.error_code, failure.error_message))
        return context

    def matrix(self, request: DecisionRequest, candidates: Sequence[Candidate]) -> npt.NDArray[np.float32]:
        """The float32 model matrix, one row per candidate.

        The last request's matrix is remembered (per thread), so `explain` after `score` on the same request
        reuses its rows instead of building them again on the request path.
        """
        memo: _MatrixMemo | None = getattr(self._memo, "last", None)
        if memo is not None and memo.request is request:
            found = memo.rows_of(candidates)
            if found is not None:
                cached: npt.NDArray[np.float32] = memo.x[np.asarray(found, dtype=np.intp)]
                return cached
        x = self.spec.transform_request(self.context(request), candidates)
        self._memo.last = _MatrixMemo(request, list(candidates), x)
        return x

    def score(self, request: DecisionRequest, candidates: Sequence[Candidate]) -> FloatArray:
        """Calibrated P(success) per candidate: retries by the retry model, retargets by the retarget model, stop 0.

        Without a retarget model (a history with no nudges) retarget candidates score 0.
        """
        out = np.zeros(len(candidates), dtype=np.float64)
        retry_action, retarget_action = Action.RETRY, Action.RETARGET  # one enum lookup each, not one per row
        # Row numbers as lists: masks would cost a numpy call per test of them.
        retry = [i for i, c in enumerate(candidates) if c.action is retry_action]
        retarget = [i for i, c in enumerate(candidates) if c.action is retarget_action]
        if self.retarget_booster is None or self.retarget_calibrator is None:
            retarget = []
        if not (retry or retarget):
            return out
        x = self.matrix(request, candidates)
        if retry:
            raw = fast_predictor(self.retry_booster).predict(x[retry])
            out[retry] = self.retry_calibrator(raw)
        if retarget and self.retarget_booster is not None and self.retarget_calibrator is not None:
            raw = fast_predictor(self.retarget_booster).predict(x[retarget])
            out[retarget] = self.retarget_calibrator(raw)
        return out

    def warm_up(
        self,
        errors: Sequence[tuple[str | None, str | None, str | None]] = (),
        *,
        between_steps: Callable[[], object] | None = None,
        known_text: Mapping[str, Sequence[float]] | None = None,
        direct_text_checked: bool = False,
    ) -> None:
        """Build now what a request would otherwise build on first use, on the request path: each booster's
        predictor (its batch, single-row and leaf calls) and explanation table, the feature plan, the catalog, the
        code inventory, and the text model's features of ``errors`` ((connector, code, message), e.g. the
        ``seen_errors`` of the version this one replaces). A swapped-in model then answers its first requests as
        fast as the one before it (unwarmed: ~60 ms for the first decision, a few ms per new error code).

        ``between_steps()`` is called after each step (each under ~1 ms in a warm process): a scorer warming a new
        version up beside its requests lets them go first there (service/api/inflight.py). ``known_text``: the text
        features of this version another process warmed (``TextModel.warm``'s ``known``), ``direct_text_checked``:
        whether it checked the text model's direct form (``TextModel.warm``'s ``direct_form_checked``)."""
        pause = between_steps if between_steps is not None else _no_pause
        for booster in (self.retry_booster, self.retarget_booster):
            if booster is None:
                continue
            predictor = fast_predictor(booster)
            for rows in (1, SINGLE_ROW_LIMIT + 1):  # the single-row path and the batch call
                x = np.zeros((rows, predictor.num_features), dtype=np.float32)
                predictor.predict(x)
                predictor.leaves(x)
            _path_table(booster)
            pause()
        self.spec._request_plan()
        self._catalog()
        self._evidence  # noqa: B018 (built now, not on a request's first explanation)
        pause()
        self.code_support("", None)
        self.cell_table("")
        self.code_level("", None)
        pause()
        # In chunks only when it pauses between them.
        self.text_model.warm(
            errors, between_steps=between_steps, known=known_text, direct_form_checked=direct_text_checked
        )

    def seen_errors(self) -> list[tuple[str | None, str | None, str | None]]:
        """The errors (connector, code, message) whose text features this model has cached, oldest first."""
        return self.text_model.cached_errors()

    def code_support(self, connector: str, code: str | None) -> int | None:
        """Silent retries after this (connector, error code) the model was trained on (0: never seen).

        None when the bundle carries no code inventory (trained before ``model.codewatch`` existed).
        """
        if self._support is None:
            inventory = inventory_of(self.metadata)
            if inventory is None:
                return None
            self._support = support_table(inventory)
        return self._support.get(code_key(connector, code), 0)

    def cell_table(self, error_class: str) -> FloatArray | None:
        """The training evidence of every cell of one error class (model.cellsupport): a (3, N_SLOTS) array of the
        support, successes and sum of the model's predictions per slot (zeros for a class never seen).

        None when the bundle carries no cells (trained before they were recorded): decide() then uses the model's
        scores as they are. Do not modify.
        """
        if self._cells is None:
            self._cells = CellSupport.from_metadata(self.metadata)
            if self._cells is None:
                return None
        return self._cells.of_class(error_class)

    def code_level(self, connector: str, code: str | None) -> tuple[float, float, float] | None:
        """The silent retries after this (connector, error code) in the whole history the version was registered
        from, their successes and the sum of its served P(success) of them (model.codelevel; zeros for a code never
        retried). None when the bundle carries no code levels (trained before they were recorded, or registered
        without the refit): decide() then uses the model's scores as they are."""
        if self._levels is None:
            self._levels = CodeLevels.from_metadata(self.metadata)
            if self._levels is None:
                return None
        return self._levels.of_code(connector, code)

    def retry_probability(self, candidates: Sequence[Candidate], scores: npt.ArrayLike) -> float:
        """P(the best permitted silent retry succeeds): the highest score among retry candidates (0 if none)."""
        values = np.asarray(scores, dtype=np.float64)
        best = [values[i] for i, c in enumerate(candidates) if c.action == Action.RETRY]
        return float(max(best)) if best else 0.0

    def explain(self, request: DecisionRequest, candidate: Candidate, k: int = 3) -> list[str]:
        """The ``k`` features that moved this candidate's score most, each as a short sentence that says what the
        evidence is and which way it points ("no issuer given: lowers the chance of success")."""
        booster = self.retry_booster if candidate.action == Action.RETRY else self.retarget_booster
        if booster is None or candidate.action == Action.STOP:
            return []
        x = self.matrix(request, [candidate])
        contributions = path_contributions(booster, x)[0]
        # Walked as Python floats (the same values): numpy's scalar indexing costs more than the lists.
        order = np.argsort(-np.abs(contributions), kind="stable").tolist()
        by_feature, row = contributions.tolist(), x[0].tolist()
        phrases: list[str] = []
        for j in order:
            if by_feature[j] == 0.0:
                break
            phrase = self._feature_reason_at(j, row[j], raises=by_feature[j] > 0)
            if phrase is not None and phrase not in phrases:
                phrases.append(phrase)
            if len(phrases) == k:
                break
        return phrases

    def feature_reason(self, name: str, value: float, *, raises: bool) -> str | None:
        """One feature's value in the model matrix as an agent reads it, with the way it moved the score; None
        for a feature without words (one a newer release added: left out rather than shown by its name)."""
        return self._feature_reason_at(self.spec.columns.index(name), value, raises=raises)

    def _feature_reason_at(self, column: int, value: float, *, raises: bool) -> str | None:
        evidence = self._evidence[column](value)
        return None if evidence is None else with_direction(evidence, raises)

    @cached_property
    def _evidence(self) -> list[Callable[[float], str | None]]:
        """Per matrix column, its value's evidence in words (model.explanations), built once per bundle."""
        return [
            self._category_evidence(name) if name in self.spec.vocabularies else partial(number_evidence, name)
            for name in self.spec.columns
        ]

    def _category_evidence(self, name: str) -> Callable[[float], str | None]:
        vocabulary = self.spec.vocabularies[name]

        def evidence(code: float) -> str | None:
            position = int(code) - 1 if math.isfinite(code) and int(code) != OTHER_CODE else -1
            category = vocabulary[position] if 0 <= position < len(vocabulary) else None
            return category_evidence(name, None if category == MISSING else category, missing=category == MISSING)

        return evidence

    # ------------------------------------------------------------------------------------------------ files

    def save(self, directory: str | Path) -> Path:
        """Write the bundle as plain files into ``directory`` (created if needed); returns the directory."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / _FILES["spec"]).write_text(self.spec.to_json(), encoding="utf-8")
        for role, booster in (("retry", self.retry_booster), ("retarget", self.retarget_booster)):
            if booster is not None:
                booster.save_model(str(path / _FILES[role]))
                _path_table(booster).save(path / _PATH_FILES[role], booster_file=path / _FILES[role])
        with (path / _FILES["text"]).open("wb") as text_file:
            pickle.dump(self.text_model, text_file, protocol=pickle.HIGHEST_PROTOCOL)
        # Also in the form the releases before text_model.pkl read, so a scorer rolled back to one of them still
        # loads a champion trained now (this release reads text_model.pkl).
        joblib.dump(self.text_model, path / _JOBLIB_TEXT_FILE)
        meta = {
            "format_version": FORMAT_VERSION,
            "version": self.version,
            "retryable_threshold": self.retryable_threshold,
            # Read by the releases before "retryable_threshold" (their decide() never applied it).
            "threshold": self.retryable_threshold,
            "catalog_version": self.catalog_version,
            "retry_calibrator": self.retry_calibrator.to_dict(),
            "retarget_calibrator": None if self.retarget_calibrator is None else self.retarget_calibrator.to_dict(),
            "metrics": _jsonable(self.metrics),
            "metadata": _jsonable(self.metadata),
        }
        (path / _FILES["meta"]).write_text(json.dumps(meta, indent=1, allow_nan=False), encoding="utf-8")
        return path

    @classmethod
    def load(
        cls,
        directory: str | Path,
        *,
        catalog: ErrorCatalog | None = None,
        between_steps: Callable[[], object] | None = None,
    ) -> ModelBundle:
        """Read a bundle written by :meth:`save`; ``catalog`` defaults to the shipped one (loaded on first use).
        ``between_steps()`` is called between its files, as by :meth:`warm_up`."""
        pause = between_steps if between_steps is not None else _no_pause
        path = Path(directory)
        text_file = path / _FILES["text"]
        if not text_file.is_file() and (path / _JOBLIB_TEXT_FILE).is_file():
            text_file = path / _JOBLIB_TEXT_FILE
        missing = [_FILES[key] for key in ("meta", "spec", "retry") if not (path / _FILES[key]).is_file()]
        if not text_file.is_file():
            missing.append(_FILES["text"])
        if missing:
            raise FileNotFoundError(f"model bundle at {path} lacks {', '.join(missing)}")
        meta = json.loads((path / _FILES["meta"]).read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"model bundle at {path} has format_version {meta.get('format_version')!r}; "
                f"this code reads {FORMAT_VERSION}"
            )
        text_model = _read_text_model(text_file)
        if not isinstance(text_model, TextModel):
            raise ValueError(f"{text_file} does not hold a TextModel")
        pause()
        retry_booster = _read_booster(path, "retry")
        pause()
        retarget_booster = _read_booster(path, "retarget") if (path / _FILES["retarget"]).is_file() else None
        pause()
        spec = FeatureSpec.from_json((path / _FILES["spec"]).read_text(encoding="utf-8"))
        if spec.retired_features:
            log.warning(
                "model version %s was trained with the retired payday features (%s: payday the 1st of the month, "
                "at the customer's local midnight); it is served with them as trained; retrain to use the rules' "
                "paydays",
                meta["version"],
                ", ".join(spec.retired_features),
            )
        return cls(
            spec=spec,
            text_model=text_model,
            retry_booster=retry_booster,
            retarget_booster=retarget_booster,
            retry_calibrator=Calibrator.from_dict(meta["retry_calibrator"]),
            retarget_calibrator=None
            if meta["retarget_calibrator"] is None
            else Calibrator.from_dict(meta["retarget_calibrator"]),
            # A bundle saved before it carried the threshold decide() applies was served with the default; its
            # "threshold" (Youden's J on per-retry outcomes) was never applied and stays unread.
            retryable_threshold=float(meta.get("retryable_threshold", DEFAULT_RETRYABLE_THRESHOLD)),
            metrics={k: (math.nan if v is None else float(v)) for k, v in meta["metrics"].items()},
            catalog_version=str(meta["catalog_version"]),
            metadata=dict(meta["metadata"]),
            version=str(meta["version"]),
            catalog=catalog,
        )


def saved_metadata(directory: str | Path) -> dict[str, Any]:
    """The ``metadata`` of the bundle saved in ``directory`` (its ``bundle.json`` only: no model is read).
    FileNotFoundError or ValueError name the folder when it holds no readable bundle metadata."""
    meta_file = Path(directory) / _FILES["meta"]
    if not meta_file.is_file():
        raise FileNotFoundError(f"model bundle at {directory} lacks {_FILES['meta']}")
    try:
        metadata = json.loads(meta_file.read_text(encoding="utf-8"))["metadata"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{meta_file} holds no bundle metadata ({type(exc).__name__}: {exc})") from None
    if not isinstance(metadata, dict):
        raise ValueError(f"{meta_file}: its metadata is not an object")
    return metadata


def _no_pause() -> None:
    """``between_steps`` when none is given."""


def _read_text_model(file: Path) -> Any:
    """The object pickled in ``file``: ``text_model.pkl``, or an older bundle's ``text_model.joblib``. ValueError
    names the file when it cannot be read (pickle's and joblib's own errors name none)."""
    try:
        if file.name == _JOBLIB_TEXT_FILE:
            return joblib.load(file)
        with file.open("rb") as opened:
            return pickle.load(opened)
    except Exception as exc:
        raise ValueError(f"{file} cannot be read ({type(exc).__name__}: {exc})") from exc


def _read_booster(path: Path, role: str) -> lgb.Booster:
    """The ``role`` booster of the bundle at ``path``, with its explanation path table when the bundle has one
    derived from this very booster file."""
    booster_file = path / _FILES[role]
    booster = lgb.Booster(model_file=str(booster_file))
    table_file = path / _PATH_FILES[role]
    if table_file.is_file():
        table = _PathTable.read(table_file, booster_file=booster_file, booster=booster)
        if table is not None:
            setattr(booster, _PATH_TABLE_ATTRIBUTE, table)
    return booster


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def bundle_version(bundle: ModelBundle) -> str:
    """A content hash of what decides scores (spec, boosters, calibrators, threshold, cell table): equal models,
    equal version."""
    digest = hashlib.sha256()
    digest.update(bundle.spec.to_json().encode())
    digest.update(bundle.retry_booster.model_to_string().encode())
    if bundle.retarget_booster is not None:
        digest.update(bundle.retarget_booster.model_to_string().encode())
    digest.update(json.dumps(bundle.retry_calibrator.to_dict()).encode())
    if bundle.retarget_calibrator is not None:
        digest.update(json.dumps(bundle.retarget_calibrator.to_dict()).encode())
    digest.update(repr(bundle.retryable_threshold).encode())
    # The cell table bounds the served P(success) by the priors where it is thin (decide(), model.cellsupport): it
    # decides scores too. A bundle without one hashes as before.
    cells = bundle.metadata.get(CELL_SUPPORT_KEY)
    if cells is not None:
        digest.update(json.dumps(_jsonable(cells)).encode())
    # So do the code levels (model.codelevel), which the fit the gate judges carries from the history before its
    # holdout. A bundle without them hashes as before.
    levels = bundle.metadata.get(CODE_LEVEL_KEY)
    if levels is not None:
        digest.update(b"code_levels")
        digest.update(json.dumps(_jsonable(levels)).encode())
    return f"wb-{digest.hexdigest()[:12]}"


def _each_json_object(node: dict[str, Any]) -> dict[str, Any]:
    """The object as parsed. Passed to ``dump_model`` as its ``object_hook`` only so that parsing the dump calls
    Python once per tree node: without one, ``json.loads`` holds the GIL for the whole dump (4-6 ms for a booster of
    ~80 trees), a wait for the requests a scorer answers while it loads a new version beside the serving one; each
    call lets them in at the interpreter's switch interval (measured: no GIL hold over 1.5 ms, same parse time)."""
    return node


class _PathTable:
    """Per tree and leaf, the change in node value each feature makes along the root-to-leaf path."""

    def __init__(self, table: npt.NDArray[np.float64], bias: float) -> None:
        self.table = table  # (trees, leaves, features)
        self.trees = np.arange(table.shape[0])[np.newaxis, :]  # indexes the table's trees, against a row's leaves
        self.bias = bias

    @classmethod
    def of(cls, booster: lgb.Booster) -> _PathTable:
        """Built from the booster's dump (Python over every tree node: ~10 ms for ~80 trees of 31 leaves)."""
        dump = booster.dump_model(object_hook=_each_json_object)
        n_features = int(dump["max_feature_idx"]) + 1
        trees = dump["tree_info"]
        leaves = max(int(tree["num_leaves"]) for tree in trees)
        table = np.zeros((len(trees), leaves, n_features), dtype=np.float64)
        bias = 0.0
        for t, tree in enumerate(trees):
            root = tree["tree_structure"]
            bias += float(root.get("internal_value", root.get("leaf_value", 0.0)))
            stack: list[tuple[dict[str, Any], npt.NDArray[np.float64]]] = [(root, np.zeros(n_features))]
            while stack:
                node, path = stack.pop()
                if "split_feature" not in node:  # a leaf (a one-leaf tree's root carries no leaf_index)
                    table[t, int(node.get("leaf_index", 0))] = path
                    continue
                here = float(node["internal_value"])
                feature = int(node["split_feature"])
                for side in ("left_child", "right_child"):
                    child = node[side]
                    value = float(child["internal_value"] if "internal_value" in child else child["leaf_value"])
                    step = path.copy()
                    step[feature] += value - here
                    stack.append((child, step))
        return cls(table, bias)

    def save(self, file: Path, *, booster_file: Path) -> None:
        """Write the table to ``file`` with the digest of the booster file it was derived from. Its non-zero cells
        only (a leaf's path crosses few features: ~8% of the table), uncompressed: read back, checks included, in
        ~0.4 ms, against ~0.9 ms for the whole table compressed with its digest."""
        flat = self.table.reshape(-1)
        index = np.flatnonzero(flat).astype(np.int64)
        np.savez(
            file,
            shape=np.asarray(self.table.shape, dtype=np.int64),
            index=index,
            values=flat[index],
            bias=np.float64(self.bias),
            booster_sha256=np.str_(_file_digest(booster_file)),
        )

    @classmethod
    def read(cls, file: Path, *, booster_file: Path, booster: lgb.Booster) -> _PathTable | None:
        """The table saved in ``file`` for ``booster`` (read from ``booster_file``), or None with a warning naming
        why when the file cannot be read, was derived from another booster file or does not fit this booster: the
        table is derived data, so the booster's own is then built on first use, as for a bundle without one."""
        try:
            with np.load(file, allow_pickle=False) as saved:
                shape = tuple(int(n) for n in saved["shape"])
                index, values = saved["index"], saved["values"]
                bias, digest = float(saved["bias"]), str(saved["booster_sha256"])
            why = _misfit(shape, index, values, digest, booster_file=booster_file, booster=booster)
            if why is None:
                table = np.zeros(shape, dtype=np.float64)
                table.reshape(-1)[index] = values
                return cls(table, bias)
        except Exception as exc:  # whatever the file holds: the booster's own table is built instead
            why = f"it cannot be read ({type(exc).__name__}: {exc})"
        log.warning("%s is not used: %s; the explanation table is built from the booster", file, why)
        return None


def _misfit(
    shape: tuple[int, ...],
    index: npt.NDArray[Any],
    values: npt.NDArray[Any],
    digest: str,
    *,
    booster_file: Path,
    booster: lgb.Booster,
) -> str | None:
    """Why a saved path table cannot serve ``booster``, or None when it can: derived from this very booster file, a
    (trees, leaves, features) table of the booster's trees, most leaves in a tree and features, in-range cells."""
    model_text = booster_file.read_bytes()
    if digest != hashlib.sha256(model_text).hexdigest():
        return f"it was derived from another {booster_file.name}"
    leaves = max((int(n) for n in _NUM_LEAVES.findall(model_text)), default=1)
    expected = (booster.num_trees(), leaves, booster.num_feature())
    integral = index.ndim == 1 and index.dtype.kind in "iu" and values.ndim == 1 and values.dtype == np.float64
    if shape != expected or not integral or index.shape != values.shape:
        return (
            f"it holds a table of shape {shape} with {index.size} {index.dtype} cells, for a booster of "
            f"{expected[0]} trees of at most {expected[1]} leaves and {expected[2]} features"
        )
    if index.size and not 0 <= int(index.min()) <= int(index.max()) < math.prod(expected):
        return f"its cells lie outside the table of shape {shape}"
    return None


#: A tree's leaf count in a LightGBM model file.
_NUM_LEAVES = re.compile(rb"\nnum_leaves=(\d+)\n")  # not ^...$ (MULTILINE): that tries a match at every byte

#: Where a booster keeps its path table (``kept_on_booster``), built or read with the bundle.
_PATH_TABLE_ATTRIBUTE = "_winback_path_table"


def _file_digest(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def _path_table(booster: lgb.Booster) -> _PathTable:
    return kept_on_booster(booster, _PATH_TABLE_ATTRIBUTE, _PathTable.of)


def path_bias(booster: lgb.Booster) -> float:
    """The raw score every row starts from (the roots' values summed over the trees)."""
    return _path_table(booster).bias


def path_contributions(booster: lgb.Booster, x: npt.NDArray[np.float32]) -> FloatArray:
    """Per-row, per-feature contributions to the raw score along each tree's decision path (Saabas).

    Bias plus the row's contributions equals the booster's raw score. LightGBM itself routes the rows
    (``pred_leaf``: categorical splits and missing values as in predict); the path table is built once per
    booster, so a row costs one leaf lookup per tree instead of TreeSHAP's ~250 µs per row on this box.
    """
    table = _path_table(booster)
    leaves = fast_predictor(booster).leaves(x)
    contributions: FloatArray = table.table[table.trees[:, : leaves.shape[1]], leaves].sum(axis=1)
    return contributions

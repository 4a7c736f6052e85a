"""LightGBM predictions for the request path: one C call, none of the Python wrapper's per-call work.

``Booster.predict`` builds a fresh predictor object on every call (deep-copying and re-serialising its parameters,
checking shapes, asking the library how many outputs to expect): ~45 us of Python before LightGBM starts, which
is a third of a whole decision's budget. ``FastPredictor`` resolves all of that once per booster and then calls
``LGBM_BoosterPredictForMat`` directly on the float32 matrix the feature builder already produced. The C function
and its arguments are the ones ``Booster.predict`` itself passes, so the outputs are the same numbers (tested).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import TypeVar

import lightgbm as lgb
import numpy as np
import numpy.typing as npt
from lightgbm.basic import _LIB, _safe_call  # type: ignore[attr-defined]  # the C library handle, not re-exported

# Constants of LightGBM's C API (c_api.h).
_DTYPE_FLOAT32 = 0
_ROW_MAJOR = 1
_PREDICT_NORMAL = 0
_PREDICT_LEAF_INDEX = 2
# What Booster.predict(x, num_threads=1) passes: one thread, as the server pins (workers share small machines).
_PARAMETERS = ctypes.c_char_p(b"num_threads=1")


class FastPredictor:
    """``booster.predict(x, num_threads=1)`` and ``pred_leaf=True`` for float32 row-major matrices."""

    def __init__(self, booster: lgb.Booster) -> None:
        self._booster = booster  # keeps the handle alive
        self._handle = booster._handle
        self.num_features = booster.num_feature()
        per_iteration = booster.num_model_per_iteration()
        if per_iteration != 1:
            raise ValueError(f"FastPredictor serves single-output boosters, this one has {per_iteration} outputs")
        # As Booster.predict: the early-stopped best iteration when the booster knows one, else every tree.
        self._iterations = booster.best_iteration if booster.best_iteration > 0 else -1
        self.num_trees = self._outputs_per_row(_PREDICT_LEAF_INDEX)

    def _outputs_per_row(self, predict_type: int) -> int:
        count = ctypes.c_int64(0)
        _safe_call(
            _LIB.LGBM_BoosterCalcNumPredict(
                self._handle,
                ctypes.c_int(1),
                ctypes.c_int(predict_type),
                ctypes.c_int(0),
                ctypes.c_int(self._iterations),
                ctypes.byref(count),
            )
        )
        return int(count.value)

    def predict(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """Transformed predictions (probabilities for a binary objective), one per row."""
        return self._call(x, _PREDICT_NORMAL, 1)

    def leaves(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.intp]:
        """Leaf index per row and tree, shape (rows, trees)."""
        out = self._call(x, _PREDICT_LEAF_INDEX, self.num_trees)
        return out.astype(np.intp).reshape(len(x), self.num_trees)

    def _call(self, x: npt.NDArray[np.float32], predict_type: int, per_row: int) -> npt.NDArray[np.float64]:
        matrix = np.ascontiguousarray(x, dtype=np.float32)
        if matrix.ndim != 2 or matrix.shape[1] != self.num_features:
            raise ValueError(f"expected a matrix with {self.num_features} columns, got shape {matrix.shape}")
        rows = matrix.shape[0]
        out = np.empty(rows * per_row, dtype=np.float64)
        if rows == 0:
            return out
        written = ctypes.c_int64(0)
        _safe_call(
            _LIB.LGBM_BoosterPredictForMat(
                self._handle,
                ctypes.c_void_p(matrix.ctypes.data),
                ctypes.c_int(_DTYPE_FLOAT32),
                ctypes.c_int32(rows),
                ctypes.c_int32(matrix.shape[1]),
                ctypes.c_int(_ROW_MAJOR),
                ctypes.c_int(predict_type),
                ctypes.c_int(0),  # start iteration
                ctypes.c_int(self._iterations),
                _PARAMETERS,
                ctypes.byref(written),
                ctypes.c_void_p(out.ctypes.data),
            )
        )
        if written.value != len(out):
            raise RuntimeError(f"LightGBM wrote {written.value} predictions, expected {len(out)}")
        return out


_LOCK = threading.Lock()
T = TypeVar("T")


def kept_on_booster(booster: lgb.Booster, attribute: str, make: Callable[[lgb.Booster], T]) -> T:
    """``make(booster)``, computed once and kept on the booster itself, so it lives and dies with the booster."""
    value: T | None = getattr(booster, attribute, None)
    if value is None:
        with _LOCK:
            value = getattr(booster, attribute, None)
            if value is None:
                value = make(booster)
                setattr(booster, attribute, value)
    return value


def fast_predictor(booster: lgb.Booster) -> FastPredictor:
    """The booster's FastPredictor, made on first use."""
    return kept_on_booster(booster, "_winback_fast_predictor", FastPredictor)

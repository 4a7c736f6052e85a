"""LightGBM predictions for the request path: one C call, none of the Python wrapper's per-call work.

``Booster.predict`` builds a fresh predictor object on every call (deep-copying and re-serialising its parameters,
checking shapes, asking the library how many outputs to expect): ~45 us of Python before LightGBM starts, which
is a third of a whole decision's budget. ``FastPredictor`` resolves all of that once per booster and then calls
``LGBM_BoosterPredictForMat`` directly on the float32 matrix the feature builder already produced. The C function
and its arguments are the ones ``Booster.predict`` itself passes, so the outputs are the same numbers (tested).

That C function still parses its parameters and builds a predictor on every call (~30 us here). A few rows
(an explanation's one) go instead through LightGBM's single-row "fast config", prepared once per booster and
output type: ~2 us a row, where a batch costs ~30 us plus ~1.3 us a row.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import lightgbm as lgb
import numpy as np
import numpy.typing as npt
from lightgbm.basic import _LIB, _safe_call  # type: ignore[attr-defined]  # the C library handle, not re-exported

FloatArray = npt.NDArray[np.float64]

# Constants of LightGBM's C API (c_api.h).
_DTYPE_FLOAT32 = 0
_ROW_MAJOR = 1
_PREDICT_NORMAL = 0
_PREDICT_LEAF_INDEX = 2
# What Booster.predict(x, num_threads=1) passes: one thread, as the server pins (workers share small machines).
_PARAMETERS = ctypes.c_char_p(b"num_threads=1")
#: Up to this many rows, one single-row call per row is cheaper than one batch call.
SINGLE_ROW_LIMIT = 8

# A library object of our own, so the argument types declared below stay out of LightGBM's own calls.
_OWN_LIB = ctypes.CDLL(_LIB._name)
_FAST_INIT = _OWN_LIB.LGBM_BoosterPredictForMatSingleRowFastInit
_FAST_INIT.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int32,
                       ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]  # fmt: skip
_FAST_ROW = _OWN_LIB.LGBM_BoosterPredictForMatSingleRowFast
_FAST_ROW.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.c_void_p]
_FAST_FREE = _OWN_LIB.LGBM_FastConfigFree
_FAST_FREE.argtypes = [ctypes.c_void_p]


class FastPredictor:
    """``booster.predict(x, num_threads=1)`` and ``pred_leaf=True`` for float32 row-major matrices."""

    def __init__(self, booster: lgb.Booster, *, hold_booster: bool = True) -> None:
        # A predictor of its own holds the booster, whose handle it calls. The one kept on the booster itself
        # (fast_predictor) holds none: a reference back would make a cycle, which only the cyclic collector frees,
        # and the scorer moves what it holds after start-up out of that collector's reach (gc.freeze in
        # service/api/app.py), so a swapped-out model would never be freed.
        self._booster = booster if hold_booster else None
        self._handle = booster._handle
        self.num_features = booster.num_feature()
        per_iteration = booster.num_model_per_iteration()
        if per_iteration != 1:
            raise ValueError(f"FastPredictor serves single-output boosters, this one has {per_iteration} outputs")
        # As Booster.predict: the early-stopped best iteration when the booster knows one, else every tree.
        self._iterations = booster.best_iteration if booster.best_iteration > 0 else -1
        self.num_trees = self._outputs_per_row(_PREDICT_LEAF_INDEX)
        self._fast_configs: dict[int, ctypes.c_void_p] = {}
        # A fast config holds one predictor with one row buffer: calls through it must not overlap.
        self._fast_lock = threading.Lock()

    def __del__(self) -> None:
        for config in getattr(self, "_fast_configs", {}).values():
            _FAST_FREE(config)

    def _fast_config(self, predict_type: int) -> ctypes.c_void_p:
        config = self._fast_configs.get(predict_type)
        if config is None:
            config = ctypes.c_void_p()
            _safe_call(
                _FAST_INIT(self._handle, predict_type, 0, self._iterations, _DTYPE_FLOAT32, self.num_features,
                           _PARAMETERS, ctypes.byref(config))
            )  # fmt: skip
            self._fast_configs[predict_type] = config
        return config

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
        if rows <= SINGLE_ROW_LIMIT:
            self._by_row(matrix, predict_type, per_row, out)
            return out
        written = ctypes.c_int64(0)
        # Plain ints are passed as C ints, which is what these int and int32_t parameters are on LightGBM's
        # platforms; the data pointers go as references to the arrays' first bytes.
        _safe_call(
            _LIB.LGBM_BoosterPredictForMat(
                self._handle,
                ctypes.byref(_first_byte(matrix)),
                _DTYPE_FLOAT32,
                rows,
                matrix.shape[1],
                _ROW_MAJOR,
                predict_type,
                0,  # start iteration
                self._iterations,
                _PARAMETERS,
                ctypes.byref(written),
                ctypes.byref(_first_byte(out)),
            )
        )
        if written.value != len(out):
            raise RuntimeError(f"LightGBM wrote {written.value} predictions, expected {len(out)}")
        return out

    def _by_row(self, matrix: npt.NDArray[np.float32], predict_type: int, per_row: int, out: FloatArray) -> None:
        written = ctypes.c_int64(0)
        written_ref = ctypes.byref(written)
        row_bytes, out_bytes = matrix.strides[0], per_row * out.itemsize
        matrix_start, out_start = _first_byte(matrix), _first_byte(out)  # kept: they hold the buffers
        data, target = ctypes.addressof(matrix_start), ctypes.addressof(out_start)
        with self._fast_lock:
            config = self._fast_config(predict_type)
            for row in range(matrix.shape[0]):
                _safe_call(_FAST_ROW(config, data + row * row_bytes, written_ref, target + row * out_bytes))
                if written.value != per_row:
                    raise RuntimeError(f"LightGBM wrote {written.value} outputs for a row, expected {per_row}")


def _first_byte(array: npt.NDArray[Any]) -> ctypes.c_char:
    """The first byte of a C-contiguous, non-empty array's data as a ctypes object (its address is the data's).

    ``array.ctypes.data`` builds numpy's ctypes helper in Python, about three times the cost of this.
    """
    try:
        return ctypes.c_char.from_buffer(array)  # type: ignore[arg-type]  # ndarray exports a buffer; its stubs say not
    except TypeError:  # a read-only array: from_buffer wants a writable buffer; the caller keeps the array alive
        return ctypes.c_char.from_address(array.ctypes.data)


_LOCK = threading.Lock()
T = TypeVar("T")


def kept_on_booster(booster: lgb.Booster, attribute: str, make: Callable[[lgb.Booster], T]) -> T:
    """``make(booster)``, computed once and kept on the booster itself, so it lives and dies with the booster.

    Two threads asking at once may both compute it; the first one kept is what both return. It is computed outside
    the module's lock: a model load giving way to the requests in the middle of computing one (service/api/
    inflight.py) must not hold a lock a request may need for another booster."""
    value: T | None = getattr(booster, attribute, None)
    if value is None:
        made = make(booster)
        with _LOCK:
            value = getattr(booster, attribute, None)
            if value is None:
                value = made
                setattr(booster, attribute, value)
    return value


def fast_predictor(booster: lgb.Booster) -> FastPredictor:
    """The booster's FastPredictor, made on first use."""
    return kept_on_booster(booster, "_winback_fast_predictor", lambda kept: FastPredictor(kept, hold_booster=False))


@contextlib.contextmanager
def lightgbm_threads(count: int) -> Iterator[None]:
    """LightGBM's maximum thread count set to ``count`` within the block (``LGBM_SetMaxThreads``), then put back.

    What a serving worker gets from ``OMP_NUM_THREADS=1`` (service/api/server.py), for a process that imported
    LightGBM without it: reading a booster's file parses its trees on every core otherwise."""
    previous = ctypes.c_int(0)
    _safe_call(_LIB.LGBM_GetMaxThreads(ctypes.byref(previous)))
    _safe_call(_LIB.LGBM_SetMaxThreads(ctypes.c_int(count)))
    try:
        yield
    finally:
        _safe_call(_LIB.LGBM_SetMaxThreads(previous))

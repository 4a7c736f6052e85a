"""Fitting the outcome boosters on a Dask cluster with ``lightgbm.dask`` (``winback train --engine dask``).

Only the LightGBM fits of the retry and retarget models are distributed: reading the history, decision points,
the catalog, the text model, the feature spec, calibration and metrics run on the driver in pandas, exactly as
with the local engine (one training code path, ``model.training.train``). The driver's feature matrix is cut into
one row block per worker and trained with ``DaskLGBMClassifier``; its ``booster_`` goes into the same bundle.

``lightgbm.dask`` has no early stopping across workers, so the fit runs ``max_rounds`` rounds and the driver then
applies the local engine's rule to the validation curve (stop after 50 rounds without a better weighted log loss,
keep the best iteration). Needs the optional extra ``dask`` (``dask[distributed]``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import lightgbm as lgb
import numpy as np
import numpy.typing as npt

from model.training import LGB_BASE_PARAMS

if TYPE_CHECKING:
    from distributed import Client

FloatArray = npt.NDArray[np.float64]
#: Rounds without a better validation loss after which the local engine stops; applied to the Dask fit's curve.
EARLY_STOPPING_ROUNDS = 50
#: ``LGB_BASE_PARAMS`` keys spelled differently by the scikit-learn API of ``DaskLGBMClassifier``.
_SKLEARN_NAMES = {
    "min_data_in_leaf": "min_child_samples",
    "min_sum_hessian_in_leaf": "min_child_weight",
    "feature_fraction": "colsample_bytree",
    "lambda_l2": "reg_lambda",
}


class DaskUnavailableError(RuntimeError):
    """The ``dask`` extra is not installed or the scheduler cannot be reached."""


def _import_dask() -> tuple[Any, Any]:
    try:
        import dask.array as da
        from lightgbm.dask import DaskLGBMClassifier
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DaskUnavailableError(
            f"--engine dask needs dask[distributed]: install winback with the 'dask' extra ({exc})"
        ) from exc
    return da, DaskLGBMClassifier


@contextmanager
def connect(scheduler: str, *, timeout: float = 30.0) -> Iterator[Client]:
    """A ``distributed.Client`` of the scheduler at ``scheduler`` (e.g. ``tcp://10.0.0.5:8786``), closed after."""
    _import_dask()
    from distributed import Client

    try:
        client = Client(scheduler, timeout=timeout, set_as_default=False)  # type: ignore[no-untyped-call]
    except (OSError, TimeoutError) as exc:
        raise DaskUnavailableError(f"cannot reach the Dask scheduler at {scheduler!r}: {exc}") from exc
    try:
        yield client
    finally:
        client.close()  # type: ignore[no-untyped-call]


def best_iteration(
    booster: lgb.Booster, x_valid: npt.NDArray[np.float32], y_valid: FloatArray, w_valid: FloatArray
) -> int:
    """The iteration (1-based) early stopping would keep: weighted log loss, patience ``EARLY_STOPPING_ROUNDS``."""
    raw = np.zeros(len(y_valid), dtype=np.float64)
    total = float(w_valid.sum())
    best, best_loss = 0, math.inf
    for tree in range(booster.num_trees()):
        raw += np.asarray(booster.predict(x_valid, raw_score=True, start_iteration=tree, num_iteration=1))
        p = np.clip(1.0 / (1.0 + np.exp(-raw)), 1e-15, 1 - 1e-15)
        loss = float(-(w_valid * (y_valid * np.log(p) + (1 - y_valid) * np.log1p(-p))).sum() / total)
        if loss < best_loss:
            best, best_loss = tree + 1, loss
        elif tree + 1 - best >= EARLY_STOPPING_ROUNDS:
            break
    return best


class DaskBoosterFitter:
    """A ``model.training.BoosterFitter`` training with ``lightgbm.dask.DaskLGBMClassifier`` on ``client``."""

    def __init__(self, client: Client, *, partitions: int | None = None) -> None:
        self.client = client
        self.partitions = partitions

    def _workers(self) -> list[str]:
        workers = sorted(self.client.scheduler_info()["workers"])
        if not workers:
            raise DaskUnavailableError("the Dask cluster has no workers")
        return workers[: self.partitions] if self.partitions else workers

    def _distribute(self, *arrays: npt.NDArray[Any]) -> list[Any]:
        """Each array as a dask array of one row block per worker, the blocks of one row range on one worker."""
        import dask.array as da
        from dask.delayed import delayed

        workers = self._workers()
        rows = max(1, math.ceil(len(arrays[0]) / len(workers)))
        blocks: list[list[Any]] = [[] for _ in arrays]
        for position, worker in enumerate(workers):
            part = slice(position * rows, (position + 1) * rows)
            if position * rows >= len(arrays[0]):
                break
            # Scattered to a named worker: lightgbm.dask trains each worker on the blocks it holds.
            futures = self.client.scatter(  # type: ignore[no-untyped-call]
                [a[part] for a in arrays], workers=[worker], broadcast=False
            )
            for out, array, future in zip(blocks, arrays, futures, strict=True):
                piece = array[part]
                out.append(da.from_delayed(delayed(future), shape=piece.shape, dtype=piece.dtype))  # type: ignore[no-untyped-call]
        return [da.concatenate(out, axis=0) for out in blocks]  # type: ignore[no-untyped-call]

    def __call__(
        self,
        x: npt.NDArray[np.float32],
        y: FloatArray,
        w: FloatArray,
        x_valid: npt.NDArray[np.float32] | None,
        y_valid: FloatArray | None,
        w_valid: FloatArray | None,
        *,
        categorical: list[int],
        names: list[str],
        seed: int,
        max_rounds: int,
        num_threads: int = 1,
    ) -> lgb.Booster:
        """Fit on the cluster, then cut the booster at the best validation iteration (as the local engine)."""
        _, classifier = _import_dask()
        params = {_SKLEARN_NAMES.get(k, k): v for k, v in LGB_BASE_PARAMS.items() if k != "seed"}
        model = classifier(
            client=self.client, n_estimators=max_rounds, random_state=seed, num_threads=num_threads, **params
        )
        x_parts, y_parts, w_parts = self._distribute(x, y, w)
        # lightgbm.dask waits on futures through distributed's default client, so ours must be the current one.
        with self.client.as_current(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # lightgbm warns about categorical_feature overrides
            model.fit(x_parts, y_parts, sample_weight=w_parts, categorical_feature=categorical, feature_name=names)
        booster: lgb.Booster = model.booster_
        if x_valid is not None and y_valid is not None and w_valid is not None and len(np.unique(y_valid)) == 2:
            best = best_iteration(booster, x_valid, y_valid, w_valid)
            if 0 < best < booster.num_trees():
                booster = lgb.Booster(model_str=booster.model_to_string(num_iteration=best))
        return booster

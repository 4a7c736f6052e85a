"""How much evidence a model was trained on, per kind of candidate: the support of each policy cell.

A cell is (error class, arm, timing). The arm is a retry strategy or a retarget channel; a retry's timing is
``now`` (executed less than ``NOW_HOURS`` after the order's first failure), ``hours`` (from then until
``LATER_HOURS``) or ``later``; a retarget has one timing. ``now`` and ``hours`` are apart because a technical fault
(an issuer or processor that is down) is most likely still in place in the first minutes and mostly gone within
hours: evidence from retries seconds after such a failure says little about one six hours later.

Training records, per cell, its fitted decision points, their successes and the sum of the model's calibrated
predictions for them (:func:`cell_rows`); the bundle carries them in its metadata (``CELL_SUPPORT_KEY``)
and decide() combines the model with the rules-only priors from them (model/policy.py, ``shrink_to_prior``): the
model where it saw a situation often, the priors where it barely saw it (e.g. a step-up, or an immediate cascade
after insufficient funds, which a logging policy seldom tries), and the model's level in a cell corrected towards
what the cell's outcomes showed.

The timing counts from the first failure, not from the decision point: what recovers an insufficient-funds decline
is time since the decline (payday), and a follow-up decision point days after the failure is no evidence about an
immediate retry of a fresh one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from model.vocab import RETRY_STRATEGIES, Action, Channel

#: Key of the bundle metadata entry holding the cell counts (rows of :func:`support_rows`).
CELL_SUPPORT_KEY = "cell_support"
#: A retry less than this many hours after the decision point (priors) or the first failure (support) is "now",
#: while the technical fault that failed the payment may still be in place: winback's choice of when such a fault
#: has had time to clear (issuer time-outs and processor outages mostly last minutes to a few hours), so a retry
#: at the first grid times (2 s, 15 min, 1 h) is not taken for one 6 h on, when nearly all have cleared
#: (data/README.md, policy/priors.yaml).
NOW_HOURS = 3.0
#: A retry this many hours or more after the decision point (priors) or the first failure (support) is "later".
LATER_HOURS = 20.0
NOW, HOURS, LATER, ANY = "now", "hours", "later", "any"
#: The timing of cells recorded before ``now`` and ``hours`` were apart: both of them (under ``LATER_HOURS``).
LEGACY_SOON = "soon"
#: The timings of a retry cell in slot order.
TIMINGS: tuple[str, ...] = (NOW, HOURS, LATER)
SLOTS_PER_ARM = len(TIMINGS)
#: The arms of a cell in slot order: retry strategies, then retarget channels. Slot of (arm i, timing t):
#: ``SLOTS_PER_ARM * i + t`` (``timing_offsets``).
ARMS: tuple[str, ...] = (*(s.value for s in RETRY_STRATEGIES), *(c.value for c in Channel))
ARM_INDEX: dict[str, int] = {arm: i for i, arm in enumerate(ARMS)}
N_SLOTS = SLOTS_PER_ARM * len(ARMS)
_NOW_SECONDS, _LATER_SECONDS = NOW_HOURS * 3600.0, LATER_HOURS * 3600.0


def timing_offsets(seconds: npt.ArrayLike) -> npt.NDArray[np.intp]:
    """The timing slot within its arm (0 now, 1 hours, 2 later) of a retry this many seconds after the clock's
    start (the decision point for priors, the first failure for cells)."""
    after = np.asarray(seconds, dtype=np.float64)
    offsets: npt.NDArray[np.intp] = (after >= _NOW_SECONDS).astype(np.intp) + (after >= _LATER_SECONDS)
    return offsets


def timing_offset(seconds: float) -> int:
    """``timing_offsets`` of one retry, without numpy (the rules-only scorer's loop)."""
    return (seconds >= _NOW_SECONDS) + (seconds >= _LATER_SECONDS)


def cell_keys(
    error_class: npt.ArrayLike,
    action: npt.ArrayLike,
    strategy: npt.ArrayLike,
    channel: npt.ArrayLike,
    hours_since_failure: npt.ArrayLike,
) -> npt.NDArray[np.object_]:
    """Each decision point's cell as ``"error_class|arm|timing"`` (None when its arm is not one of ``ARMS``).

    Arguments are aligned per decision point; NaN hours (no failure time) count as ``now``.
    """
    actions = np.asarray(action, dtype=object)
    is_retry = actions == Action.RETRY.value
    arm = np.where(is_retry, np.asarray(strategy, dtype=object), np.asarray(channel, dtype=object))
    hours = np.asarray(hours_since_failure, dtype=np.float64)
    retry_timing = np.array(TIMINGS, dtype=object)[timing_offsets(np.nan_to_num(hours, nan=0.0) * 3600.0)]
    timing = np.where(is_retry, retry_timing, ANY)
    classes = [c if isinstance(c, str) else "unknown" for c in np.asarray(error_class, dtype=object).tolist()]
    keep = np.isin(arm, ARMS) & (is_retry | (actions == Action.RETARGET.value))
    keys = np.full(len(actions), None, dtype=object)
    keys[keep] = [
        f"{c}|{a}|{t}" for c, a, t in zip(np.asarray(classes, dtype=object)[keep], arm[keep], timing[keep], strict=True)
    ]
    return keys


def cell_rows(keys: npt.ArrayLike, labels: npt.ArrayLike, predicted: npt.ArrayLike) -> list[list[Any]]:
    """The JSON form kept in bundle metadata, sorted: ``[error_class, arm, timing, n, successes, predicted]`` per
    cell, with ``predicted`` the sum of the model's calibrated P(success) over the cell's decision points."""
    return [[*key.split("|"), n, won, total] for key, n, won, total in evidence_by_key(keys, labels, predicted)]


def evidence_by_key(
    keys: Sequence[str | None] | npt.ArrayLike, labels: npt.ArrayLike, predicted: npt.ArrayLike
) -> list[tuple[str, int, int, float]]:
    """Per key (None: left out), sorted: the decision points, their successes and the sum of the P(success)
    predicted for them (rounded to 6 places): the evidence of a cell here, of an error code in model.codelevel."""
    frame = pd.DataFrame(
        {
            "key": np.asarray(keys, dtype=object),
            "y": np.asarray(labels, dtype=np.float64),
            "p": np.asarray(predicted, dtype=np.float64),
        }
    ).dropna(subset=["key"])
    table = frame.groupby("key", sort=True).agg(n=("y", "size"), successes=("y", "sum"), predicted=("p", "sum"))
    n, successes, total = (table[name].to_numpy(dtype=np.float64).tolist() for name in table.columns)
    return [
        (str(key), int(count), int(won), round(sum_p, 6))
        for key, count, won, sum_p in zip(table.index.tolist(), n, successes, total, strict=True)
    ]


class CellSupport:
    """The cell table of a bundle: per error class, a (3, N_SLOTS) array of the training support, the successes
    and the sum of the model's predictions of every slot (see ``ARMS``; a retarget's count is in each of its slots)."""

    def __init__(self, rows: Sequence[Sequence[Any]]) -> None:
        self._by_class: dict[str, npt.NDArray[np.float64]] = {}
        for cls, arm, timing, n, successes, predicted in rows:
            index = ARM_INDEX.get(str(arm))
            if index is None:
                continue
            table = self._by_class.setdefault(str(cls), np.zeros((3, N_SLOTS), dtype=np.float64))
            first = SLOTS_PER_ARM * index
            if timing in TIMINGS:
                slots = [first + TIMINGS.index(str(timing))]
            elif timing == LEGACY_SOON:  # recorded before now and hours were apart: evidence for both
                slots = [first, first + 1]
            else:  # a retarget's one timing
                slots = list(range(first, first + SLOTS_PER_ARM))
            table[:, slots] += np.array([[float(n)], [float(successes)], [float(predicted)]])
        self._empty = np.zeros((3, N_SLOTS), dtype=np.float64)

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> CellSupport | None:
        """The table of a bundle's metadata; None for a bundle trained before cells were recorded."""
        rows = metadata.get(CELL_SUPPORT_KEY)
        return None if rows is None else cls(rows)

    def of_class(self, error_class: str) -> npt.NDArray[np.float64]:
        """(support, successes, predicted) per slot for one error class (zeros for a class the model never saw).
        Do not modify."""
        return self._by_class.get(error_class, self._empty)

"""How a model's level for one error code compares with what that code's silent retries showed: the code levels.

The boosters learn an error code's retryability from its features, the text model's estimate included, and a code
that appeared only recently has all its retries in the time holdout, out of the boosters' reach; a retrain that
refits only the text model barely moves such a code's scores (the boosters make little use of the text features).
So the version ``train``/``retrain`` registers also records, per (connector, error code), over the WHOLE history
(its holdout too, as the code inventory of ``model.codewatch``): the silent retries n after a failure with that
code, their successes s and the sum m of the P(success) that version serves for them (``CODE_LEVEL_KEY`` in the
bundle metadata, rows of :func:`code_level_rows`; ``model.training.code_levels``). Served means as decide()
computes it before this correction: the calibrated model weighed against its cell's rules-only prior
(model.cellsupport, ``shrink_to_prior``) with the default ``PolicyConfig.prior_strength``
(``CODE_LEVEL_PRIOR_STRENGTH_KEY`` keeps the value used).

decide() multiplies that served P(success) of every silent-retry candidate of the failure's code by
:func:`code_factor`, after the cell shrinkage (model/policy.py). The code's success rate has the prior
Beta(k * mu, k * (1 - mu)) centred on the served mean mu = m / n for it, with k (``PolicyConfig.code_strength``)
retries of weight; its posterior mean over the served mean is

    (s + k * mu) / (m + k * mu)  =  (n * s / m + k) / (n + k),

the code's observed-to-served ratio weighed against 1 by n / (n + k): 1 (decide() as before) for a code never
retried, s / m for one retried often, so the served predictions at its retries sum to its successes. One factor per
code keeps the ranking of that code's strategies, connectors and delays.

Why after the cells, on the served level: the cells correct the model per (error class, arm, timing) and fall back
to the priors where the logging policy seldom acted; a code's retries are evidence about that code wherever its
cells are thin, and measured on the served level the cell correction is not counted twice. A serving
``prior_strength`` other than the recorded one leaves a small mismatch (the factor was measured at the recorded one).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from model.cellsupport import evidence_by_key
from model.codewatch import code_key

#: Key of the bundle metadata entry holding the code levels (rows of :func:`code_level_rows`).
CODE_LEVEL_KEY = "code_levels"
#: Key of the bundle metadata entry holding the ``PolicyConfig.prior_strength`` the code levels were served at.
CODE_LEVEL_PRIOR_STRENGTH_KEY = "code_levels_prior_strength"


def code_level_rows(
    connectors: npt.ArrayLike, codes: npt.ArrayLike, labels: npt.ArrayLike, predicted: npt.ArrayLike
) -> list[list[Any]]:
    """The JSON form kept in bundle metadata, sorted by key: ``[connector, code, n, successes, predicted]`` per
    (connector, error code) of the silent retries given (aligned: the failure's connector and code, the retry's
    outcome and the P(success) served for it). Retries after a failure without a code are left out."""
    keys = [
        code_key(connector, code) if isinstance(code, str) and code.strip() else None
        for connector, code in zip(
            np.asarray(connectors, dtype=object).tolist(), np.asarray(codes, dtype=object).tolist(), strict=True
        )
    ]
    rows: list[list[Any]] = []
    for key, count, won, sum_p in evidence_by_key(keys, labels, predicted):
        connector, _, code = key.partition("|")
        rows.append([connector, code, count, won, sum_p])
    return rows


def code_factor(n: float, successes: float, predicted: float, strength: float) -> float:
    """The multiplicative correction of the served P(success) of one error code's silent retries:
    ``(n * s / m + k) / (n + k)`` (module docstring); exactly 1 with no retries (or no predicted success)."""
    if n <= 0.0 or predicted <= 0.0:
        return 1.0
    return (n * max(successes, 0.0) / predicted + strength) / (n + strength)


class CodeLevels:
    """The code-level table of a bundle: ``code_key -> (n, successes, predicted)``."""

    def __init__(self, rows: Sequence[Sequence[Any]]) -> None:
        self._by_code: dict[str, tuple[float, float, float]] = {}
        for connector, code, n, successes, predicted in rows:
            key = code_key(connector, code)
            old = self._by_code.get(key, (0.0, 0.0, 0.0))
            self._by_code[key] = (old[0] + float(n), old[1] + float(successes), old[2] + float(predicted))

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> CodeLevels | None:
        """The table of a bundle's metadata; None for a bundle that carries none (trained before code levels were
        recorded, or registered without the refit)."""
        rows = metadata.get(CODE_LEVEL_KEY)
        return None if rows is None else cls(rows)

    def of_code(self, connector: str, code: str | None) -> tuple[float, float, float]:
        """(n, successes, predicted) of one (connector, error code); zeros for a code never retried."""
        return self._by_code.get(code_key(connector, code), (0.0, 0.0, 0.0))


class CodeLevelsOverTime:
    """Code levels as they stood at any moment: per (connector, error code), the silent retries carried out before
    it, their successes and the sum of the P(success) served for them (``of_code_at``).

    The promotion gate judges a fit on its holdout with these (pipelines.train.ForwardLevelsScorer): a point sees the
    retries whose outcomes were known before it, the holdout's earlier ones too, never its own outcome or a later one,
    as a version kept up to date would have served it."""

    def __init__(
        self,
        keys: Sequence[str],
        known_ns: npt.ArrayLike,
        labels: npt.ArrayLike,
        predicted: npt.ArrayLike,
    ) -> None:
        moments = np.asarray(known_ns, dtype=np.int64)
        won = np.asarray(labels, dtype=np.float64)
        served = np.asarray(predicted, dtype=np.float64)
        frame = pd.DataFrame({"key": np.asarray(keys, dtype=object), "at": moments})
        self._by_code: dict[str, tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64]]] = {}
        for key, rows in frame.groupby("key", sort=False).indices.items():
            chosen = rows[np.argsort(moments[rows], kind="stable")]
            # Cumulative successes and served sums with a leading 0: the first k retries' totals sit at index k.
            self._by_code[str(key)] = (
                moments[chosen],
                np.concatenate(([0.0], np.cumsum(won[chosen]))),
                np.concatenate(([0.0], np.cumsum(served[chosen]))),
            )

    def of_code_at(self, connector: str, code: str | None, moment_ns: int) -> tuple[float, float, float]:
        """(n, successes, predicted) of one (connector, error code) over its retries carried out before
        ``moment_ns`` (ns since the epoch); zeros for a code not retried by then."""
        found = self._by_code.get(code_key(connector, code))
        if found is None:
            return (0.0, 0.0, 0.0)
        moments, successes, served = found
        n = int(np.searchsorted(moments, moment_ns, side="left"))
        return (float(n), float(successes[n]), float(served[n]))

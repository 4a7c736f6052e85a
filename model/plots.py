"""Evaluation plots logged as MLflow artifacts. Each function takes data and an output path, writes a PNG
and returns the path. matplotlib is imported (and switched to the Agg backend) inside the functions, so
importing this module costs nothing and never touches a display."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

_DPI = 110


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, out_path: str | Path) -> Path:
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=_DPI)
    _pyplot().close(figure)
    return path


def _require(frame: pd.DataFrame, columns: tuple[str, ...], what: str) -> None:
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ValueError(f"{what} needs column(s) {', '.join(missing)}; got {', '.join(map(str, frame.columns))}")


def calibration_curves(tables: Mapping[str, pd.DataFrame], out_path: str | Path) -> Path:
    """Reliability diagram: one line per model from `model.evaluation.reliability_table` output
    (``mean_predicted`` vs ``observed_rate``, marker size by bin count), with the diagonal."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.0, 5.5))
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfectly calibrated")
    for name, table in tables.items():
        _require(table, ("mean_predicted", "observed_rate", "n"), "calibration_curves")
        filled = table[table["n"] > 0]
        total = max(int(filled["n"].sum()), 1)
        axis.plot(filled["mean_predicted"], filled["observed_rate"], marker="o", label=str(name), linewidth=1.5)
        axis.scatter(filled["mean_predicted"], filled["observed_rate"], s=20 + 400 * filled["n"] / total, alpha=0.25)
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_xlabel("mean predicted probability")
    axis.set_ylabel("observed success rate")
    axis.set_title("Calibration (holdout)")
    axis.legend(loc="upper left", fontsize=8)
    return _save(figure, out_path)


def feature_importance(importance: pd.DataFrame, out_path: str | Path, top: int = 25) -> Path:
    """Horizontal bars of the ``top`` features by ``gain`` (columns ``feature``, ``gain``; an optional
    ``model`` column gives one panel per model)."""
    _require(importance, ("feature", "gain"), "feature_importance")
    plt = _pyplot()
    groups = list(importance.groupby("model", sort=False)) if "model" in importance.columns else [("", importance)]
    groups = groups or [("", importance)]
    height = max(3.0, 0.28 * min(top, max(len(part) for _, part in groups)) + 1.2)
    figure, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), height), squeeze=False)
    for axis, (name, part) in zip(axes[0], groups, strict=True):
        best = part.groupby("feature")["gain"].sum().sort_values(ascending=False).head(top)[::-1]
        axis.barh(best.index.astype(str), best.to_numpy(dtype=np.float64), color="#4C72B0")
        axis.set_xlabel("gain")
        axis.set_title(f"Feature importance {name!s}".strip() + f" (top {len(best)})")
        axis.tick_params(axis="y", labelsize=8)
    return _save(figure, out_path)


def retryability_by_error_class(table: pd.DataFrame, out_path: str | Path) -> Path:
    """Grouped bars per error class: mean predicted retry probability and observed retry success
    (`model.evaluation.retryability_by_class` output, error class as index or column)."""
    frame = table.reset_index() if "error_class" not in table.columns else table
    _require(frame, ("error_class", "mean_predicted_retry_probability", "observed_retry_success"), "retryability plot")
    plt = _pyplot()
    x = np.arange(len(frame))
    figure, axis = plt.subplots(figsize=(max(6.0, 0.7 * len(frame) + 2), 4.5))
    width = 0.4
    axis.bar(
        x - width / 2,
        frame["mean_predicted_retry_probability"].to_numpy(dtype=np.float64),
        width,
        label="mean predicted retry probability",
        color="#4C72B0",
    )
    observed = frame["observed_retry_success"].to_numpy(dtype=np.float64)
    axis.bar(x + width / 2, np.nan_to_num(observed, nan=0.0), width, label="observed retry success", color="#DD8452")
    axis.set_xticks(x, frame["error_class"].astype(str), rotation=35, ha="right", fontsize=8)
    axis.set_ylim(0, 1)
    axis.set_ylabel("probability")
    axis.set_title("Retryability by error class")
    axis.legend(fontsize=8)
    return _save(figure, out_path)


def policy_value(
    ope: pd.DataFrame, out_path: str | Path, episodes: pd.DataFrame | None = None, estimator: str = "dr"
) -> Path:
    """Policy value vs baselines: bars of the OPE estimate (``estimator``, falling back to SNIPS when it is
    absent for a policy) with CI whiskers, the logged on-policy value as a reference line, and, when given,
    a second panel with each policy's simulated net value (USD)."""
    _require(ope, ("policy", "estimator", "value", "ci_low", "ci_high"), "policy_value")
    plt = _pyplot()
    panels = 2 if episodes is not None and not episodes.empty else 1
    figure, axes = plt.subplots(1, panels, figsize=(6.0 * panels, 4.5), squeeze=False)
    axis = axes[0][0]
    chosen = []
    for name, part in ope[ope["policy"] != "logged"].groupby("policy", sort=False):
        pick = part[part["estimator"] == estimator]
        if pick.empty:
            pick = part[part["estimator"] == "snips"]
        if not pick.empty:
            chosen.append((str(name), pick.iloc[0]))
    names = [name for name, _ in chosen]
    values = np.array([row["value"] for _, row in chosen], dtype=np.float64)
    low = np.array([row["ci_low"] for _, row in chosen], dtype=np.float64)
    high = np.array([row["ci_high"] for _, row in chosen], dtype=np.float64)
    errors = np.nan_to_num(np.vstack([values - low, high - values]).clip(min=0), nan=0.0)
    axis.bar(names, values, yerr=errors if len(names) else None, capsize=4, color="#4C72B0")
    reference = ope[(ope["policy"] == "logged") & (ope["estimator"] == "on_policy")]
    if not reference.empty:
        axis.axhline(float(reference["value"].iloc[0]), color="grey", linestyle="--", linewidth=1, label="logged")
        axis.legend(fontsize=8)
    axis.set_ylabel("estimated value per decision")
    axis.set_title(f"Off-policy value ({estimator}, 95% CI)")
    axis.tick_params(axis="x", rotation=20, labelsize=8)
    if panels == 2 and episodes is not None:
        _require(episodes, ("policy", "net_value_usd"), "policy_value episodes")
        right = axes[0][1]
        right.bar(episodes["policy"].astype(str), episodes["net_value_usd"].to_numpy(dtype=np.float64), color="#55A868")
        right.set_ylabel("net recovered value (USD)")
        right.set_title("Simulated episodes")
        right.tick_params(axis="x", rotation=20, labelsize=8)
    return _save(figure, out_path)

"""The performance page's pictures: PNGs drawn with matplotlib (Agg, no display) from the executor's tables and
the decisions table, for one merchant over the last N days; each rendered on request and cached briefly.
"""

from __future__ import annotations

import io
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from model.catalog import ErrorCatalog
from model.vocab import Channel, Strategy
from service.api.store import decisions
from service.console.views import channel_name, error_class_of
from service.executor.core import held_back
from service.executor.store import as_utc, nudges, orders, transactions

CHARTS: dict[str, str] = {
    "funnel": "Recovery funnel by nudge number",
    "recovery": "Recovery rate and recovered GMV over time",
    "retryability": "Retryability by error class",
    "heatmap": "Link clicks by channel and hour",
}
_INK = "#1f2933"
_MUTED = "#6b7785"
_GRID = "#e4e7eb"
_BLUE = "#2f6fb0"
_BLUE_LIGHT = "#9cc0e6"
_GREEN = "#2e8b57"
_GREEN_LIGHT = "#9fd4b5"
_RED_LIGHT = "#e7b0a9"
_GREY_LIGHT = "#d5d9de"
_DPI = 110


#: matplotlib is neither safe to import from several threads at once nor documented as thread-safe: charts
#: are drawn one at a time (they are cached, so this costs little).
_DRAWING = threading.Lock()


class UnknownChartError(LookupError):
    """No chart of that name."""


# ------------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class PerformanceData:
    """The rows of one merchant's last ``days`` days that every chart reads."""

    orders: list[dict[str, Any]]
    attempts: list[dict[str, Any]]
    nudges: list[dict[str, Any]]
    retryable: dict[str, list[bool]]  # order_id -> the `retryable` verdict of each of its decisions
    zone: ZoneInfo
    since: datetime
    days: int


def load_performance(engine: Engine, merchant_id: str, zone: ZoneInfo, now: datetime, days: int) -> PerformanceData:
    """Orders that first failed in the last ``days`` days, with their attempts, nudges and decision verdicts."""
    since = now - timedelta(days=days)
    with engine.connect() as conn:
        order_rows = [
            dict(row)
            for row in conn.execute(
                sa.select(
                    orders.c.order_id,
                    orders.c.state,
                    orders.c.amount,
                    orders.c.currency,
                    orders.c.first_failed_at,
                    orders.c.closed_at,
                    orders.c.request_json,
                ).where(orders.c.merchant_id == merchant_id, orders.c.first_failed_at >= since)
            ).mappings()
        ]
        wanted = sa.select(orders.c.order_id).where(
            orders.c.merchant_id == merchant_id, orders.c.first_failed_at >= since
        )
        attempt_rows = [
            dict(row)
            for row in conn.execute(
                sa.select(transactions).where(
                    transactions.c.merchant_id == merchant_id, transactions.c.order_id.in_(wanted)
                )
            ).mappings()
        ]
        nudge_rows = [
            dict(row)
            for row in conn.execute(
                sa.select(nudges).where(nudges.c.merchant_id == merchant_id, nudges.c.order_id.in_(wanted))
            ).mappings()
        ]
        retryable: dict[str, list[bool]] = defaultdict(list)
        for order_id, answer in conn.execute(
            sa.select(decisions.c.order_id, decisions.c.answer_json).where(
                decisions.c.merchant_id == merchant_id, decisions.c.order_id.in_(wanted)
            )
        ):
            retryable[order_id].append(bool(orjson.loads(answer).get("retryable")))
    return PerformanceData(order_rows, attempt_rows, nudge_rows, dict(retryable), zone, since, days)


def funnel_by_nudge(data: PerformanceData) -> list[tuple[int, int, int, int, int]]:
    """Per nudge number k: (k, sent, delivered, clicked, paid through that nudge's link).

    A message WhatsApp held back (a try-later, a rate limit: ``held_back``) never reached the customer and takes
    no number, as it does not count against ``max_nudges``: it is sent and not delivered under the number of the
    message that went in its place, which is that number too (numbered by its place among all, a held-back first
    message made the one that reached the customer its "nudge 2")."""
    paid_nudges = {
        row["nudge_id"]
        for row in data.attempts
        if row["status"] == "success" and row["strategy"] == Strategy.RETARGET_LINK and row["nudge_id"]
    }
    by_order: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in data.nudges:
        by_order[row["order_id"]].append(row)
    counts: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for rows in by_order.values():
        number = 0
        for row in sorted(rows, key=lambda r: as_utc(r["sent_at"])):
            held = held_back(row["delivered"], row.get("error"))
            number += not held
            if row["status"] != "accepted":
                continue
            bucket = counts[number + held]
            bucket[0] += 1
            bucket[1] += bool(row["delivered"])
            bucket[2] += row["clicked_at"] is not None
            bucket[3] += row["nudge_id"] in paid_nudges
    return [(k, *counts[k]) for k in sorted(counts)]  # type: ignore[misc]


def recovery_by_day(data: PerformanceData) -> tuple[list[date], list[float | None], list[float], str]:
    """Per local day of first failure: recovery rate among closed orders, recovered GMV, and its currency."""
    currencies = Counter(row["currency"] for row in data.orders)
    currency = currencies.most_common(1)[0][0] if currencies else ""
    start = as_utc(data.since).astimezone(data.zone).date()
    days = [start + timedelta(days=i) for i in range(data.days + 1)]
    closed: Counter[date] = Counter()
    won: Counter[date] = Counter()
    gmv: defaultdict[date, float] = defaultdict(float)
    for row in data.orders:
        day = as_utc(row["first_failed_at"]).astimezone(data.zone).date()
        if row["state"] in {"SUCCEEDED", "FAILED"}:
            closed[day] += 1
        if row["state"] == "SUCCEEDED":
            won[day] += 1
            if row["currency"] == currency:
                gmv[day] += float(row["amount"])
    rates = [won[day] / closed[day] if closed[day] else None for day in days]
    return days, rates, [gmv[day] for day in days], currency


def retryability_by_class(
    data: PerformanceData, catalog: ErrorCatalog
) -> list[tuple[str, int, float, float, float, float, float, float | None]]:
    """Per error class of the first failure: (class, orders, share recovered by silent retry, by link, outside
    winback, failed, still open, share of decisions that judged the failure retryable)."""
    first: dict[str, dict[str, Any]] = {}
    how: dict[str, str] = {}
    for row in sorted(data.attempts, key=lambda r: r["attempt_number"]):
        first.setdefault(row["order_id"], row)
        if row["status"] == "success":
            how[row["order_id"]] = "link" if row["strategy"] == Strategy.RETARGET_LINK else "retry"
    groups: dict[str, Counter[str]] = defaultdict(Counter)
    verdicts: dict[str, list[bool]] = defaultdict(list)
    for order in data.orders:
        attempt = first.get(order["order_id"])
        if attempt is None:
            continue
        payment = orjson.loads(order["request_json"]).get("payment") or {}
        error_class = error_class_of(catalog, attempt, payment)
        if order["state"] == "SUCCEEDED":
            # A success winback did not make (the payment-succeeded event) has no attempt of ours.
            outcome = how.get(order["order_id"], "elsewhere")
        else:
            outcome = "failed" if order["state"] == "FAILED" else "open"
        groups[error_class][outcome] += 1
        verdicts[error_class].extend(data.retryable.get(order["order_id"], []))
    result = []
    for error_class, counter in groups.items():
        total = sum(counter.values())
        seen = verdicts[error_class]
        result.append(
            (
                error_class,
                total,
                counter["retry"] / total,
                counter["link"] / total,
                counter["elsewhere"] / total,
                counter["failed"] / total,
                counter["open"] / total,
                sum(seen) / len(seen) if seen else None,
            )
        )
    return sorted(result, key=lambda r: (r[2] + r[3], r[1]))


def clicks_by_channel_hour(data: PerformanceData) -> tuple[list[str], list[list[int]], list[list[int]]]:
    """Channels, and per channel x local hour of sending: links sent and links clicked."""
    channels = [channel.value for channel in Channel]
    sent = [[0] * 24 for _ in channels]
    clicked = [[0] * 24 for _ in channels]
    for row in data.nudges:
        if row["status"] != "accepted" or row["channel"] not in channels:
            continue
        index = channels.index(row["channel"])
        hour = as_utc(row["sent_at"]).astimezone(data.zone).hour
        sent[index][hour] += 1
        clicked[index][hour] += row["clicked_at"] is not None
    keep = [i for i in range(len(channels)) if sum(sent[i])] or list(range(len(channels)))
    return [channels[i] for i in keep], [sent[i] for i in keep], [clicked[i] for i in keep]


# ----------------------------------------------------------------------------------------------- drawing


def _figure(width: float = 7.6, height: float = 3.7) -> Any:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=_DPI)
    figure.patch.set_facecolor("white")
    return figure


def _style(axes: Any) -> None:
    axes.set_facecolor("white")
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        axes.spines[side].set_color(_GRID)
    axes.tick_params(colors=_MUTED, labelsize=8)
    axes.yaxis.label.set_color(_MUTED)
    axes.xaxis.label.set_color(_MUTED)
    axes.grid(axis="y", color=_GRID, linewidth=0.8)
    axes.set_axisbelow(True)


def _empty(axes: Any, message: str) -> None:
    axes.set_axis_off()
    axes.text(0.5, 0.5, message, ha="center", va="center", color=_MUTED, fontsize=11, transform=axes.transAxes)


def _png(figure: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=_DPI, facecolor="white")
    return buffer.getvalue()


def draw_funnel(data: PerformanceData) -> bytes:
    """Grouped bars: links sent, delivered, clicked and paid, by nudge number."""
    figure = _figure()
    axes = figure.add_subplot()
    rows = funnel_by_nudge(data)
    if not rows:
        _empty(axes, "No payment links sent in this period")
        return _png(figure)
    _style(axes)
    width = 0.2
    labels = ["sent", "delivered", "clicked", "paid"]
    colours = [_BLUE_LIGHT, _BLUE, _GREEN_LIGHT, _GREEN]
    xs = list(range(len(rows)))
    for position, (label, colour) in enumerate(zip(labels, colours, strict=True)):
        values = [row[position + 1] for row in rows]
        bars = axes.bar([x + (position - 1.5) * width for x in xs], values, width, label=label, color=colour)
        if label == "paid":
            for bar, row in zip(bars, rows, strict=True):
                share = row[4] / row[1] if row[1] else 0.0
                axes.annotate(
                    f"{share:.0%}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                    color=_INK,
                    xytext=(0, 2),
                    textcoords="offset points",
                )
    axes.set_xticks(xs, [f"nudge {row[0]}" for row in rows])
    axes.set_ylabel("links")
    axes.set_xlim(-0.6, max(len(rows), 4) - 0.4)
    axes.legend(frameon=False, fontsize=8, ncols=4, loc="lower left", bbox_to_anchor=(0.0, 1.0))
    axes.text(1.0, 1.02, "% = paid / sent", transform=axes.transAxes, ha="right", va="bottom", fontsize=8, color=_MUTED)
    return _png(figure)


def draw_recovery(data: PerformanceData) -> bytes:
    """Bars of recovered GMV per day of first failure, with the recovery rate as a line on a second axis."""
    from matplotlib.ticker import FuncFormatter, PercentFormatter

    figure = _figure()
    axes = figure.add_subplot()
    days, rates, gmv, currency = recovery_by_day(data)
    if not data.orders:
        _empty(axes, "No failed orders in this period")
        return _png(figure)
    _style(axes)
    axes.bar(days, gmv, color=_GREEN_LIGHT, width=0.8, label=f"recovered GMV ({currency})")
    axes.set_ylabel(f"recovered GMV, {currency}")
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:,.0f}"))
    rate_axes = axes.twinx()
    points = [(day, rate) for day, rate in zip(days, rates, strict=True) if rate is not None]
    if points:
        rate_axes.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            color=_BLUE,
            marker="o",
            markersize=3,
            linewidth=1.6,
            label="recovery rate",
        )
    rate_axes.set_ylim(0, 1)
    rate_axes.yaxis.set_major_formatter(PercentFormatter(1.0))
    rate_axes.tick_params(colors=_MUTED, labelsize=8)
    for side in ("top", "left", "bottom"):
        rate_axes.spines[side].set_visible(False)
    rate_axes.spines["right"].set_color(_GRID)
    rate_axes.set_ylabel("recovered / closed orders", color=_MUTED)
    axes.tick_params(axis="x", rotation=0)
    import matplotlib.dates as mdates

    locator = mdates.AutoDateLocator(maxticks=8)  # type: ignore[no-untyped-call]
    axes.xaxis.set_major_locator(locator)
    axes.xaxis.set_major_formatter(mdates.DateFormatter("%d %b"))  # type: ignore[no-untyped-call]
    handles = axes.get_legend_handles_labels()
    more = rate_axes.get_legend_handles_labels()
    axes.legend(handles[0] + more[0], handles[1] + more[1], frameon=False, fontsize=8, loc="upper left")
    return _png(figure)


def draw_retryability(data: PerformanceData, catalog: ErrorCatalog) -> bytes:
    """Stacked horizontal bars per error class: recovered by retry, by link, failed, open; and the share of
    decisions that judged the class retryable, as a dot."""
    from matplotlib.ticker import PercentFormatter

    rows = retryability_by_class(data, catalog)
    figure = _figure(height=max(3.2, 1.2 + 0.34 * len(rows)))
    axes = figure.add_subplot()
    if not rows:
        _empty(axes, "No failed orders in this period")
        return _png(figure)
    _style(axes)
    axes.grid(axis="y", visible=False)
    axes.grid(axis="x", color=_GRID, linewidth=0.8)
    labels = [f"{row[0].replace('_', ' ')} ({row[1]})" for row in rows]
    ys = list(range(len(rows)))
    left = [0.0] * len(rows)
    for index, (label, colour) in enumerate(
        zip(
            ("silent retry", "payment link", "paid elsewhere", "failed", "still open"),
            (_BLUE, _GREEN, _GREEN_LIGHT, _RED_LIGHT, _GREY_LIGHT),
            strict=True,
        )
    ):
        values = [float(row[2 + index] or 0.0) for row in rows]
        axes.barh(ys, values, left=left, color=colour, height=0.62, label=label)
        left = [a + b for a, b in zip(left, values, strict=True)]
    marks = [(row[7], y) for row, y in zip(rows, ys, strict=True) if row[7] is not None]
    if marks:
        axes.scatter(
            [m[0] for m in marks],
            [m[1] for m in marks],
            marker="D",
            s=18,
            color=_INK,
            zorder=3,
            label="judged retryable",
        )
    axes.set_yticks(ys, labels)
    axes.set_xlim(0, 1)
    axes.xaxis.set_major_formatter(PercentFormatter(1.0))
    axes.legend(frameon=False, fontsize=8, ncols=3, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    return _png(figure)


def draw_heatmap(data: PerformanceData) -> bytes:
    """Click rate of payment links by channel and local hour of sending (blank: nothing sent)."""
    import numpy as np

    channels, sent, clicked = clicks_by_channel_hour(data)
    figure = _figure(height=1.3 + 0.45 * len(channels))
    axes = figure.add_subplot()
    if not any(sum(row) for row in sent):
        _empty(axes, "No payment links sent in this period")
        return _png(figure)
    sent_array = np.array(sent, dtype=float)
    rate = np.divide(
        np.array(clicked, dtype=float), sent_array, out=np.full_like(sent_array, np.nan), where=sent_array > 0
    )
    from matplotlib import colormaps

    palette = colormaps["Blues"].with_extremes(bad="#f5f6f7")
    image = axes.imshow(
        np.ma.masked_invalid(rate), aspect="auto", cmap=palette, vmin=0, vmax=max(0.05, float(np.nanmax(rate)))
    )
    axes.set_yticks(range(len(channels)), [channel_name(c) for c in channels])
    axes.set_xticks(range(0, 24, 2), [f"{h:02d}" for h in range(0, 24, 2)])
    axes.set_xlabel(f"hour sent ({data.zone.key})")
    axes.tick_params(colors=_MUTED, labelsize=8, length=0)
    for side in axes.spines.values():
        side.set_visible(False)
    for row in range(len(channels)):
        for hour in range(24):
            if sent[row][hour]:
                value = rate[row][hour]
                axes.text(
                    hour,
                    row,
                    f"{value:.0%}",
                    ha="center",
                    va="center",
                    fontsize=6.5,
                    color="white" if value > 0.6 * float(np.nanmax(rate)) else _INK,
                )
    bar = figure.colorbar(image, ax=axes, fraction=0.025, pad=0.01)
    bar.ax.tick_params(labelsize=7, colors=_MUTED)
    bar.outline.set_visible(False)
    bar.set_label("click rate", color=_MUTED, fontsize=8)
    return _png(figure)


# ------------------------------------------------------------------------------------------------- cache


class ChartCache:
    """Rendered charts by (merchant, chart, days), reused for ``ttl`` seconds."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._items: dict[tuple[str, str, int], tuple[float, bytes]] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, int], render: Callable[[], bytes]) -> bytes:
        """The cached PNG of ``key``, or ``render()`` stored for next time."""
        now = self.clock()
        with self._lock:
            found = self._items.get(key)
            if found is not None and found[0] > now:
                return found[1]
        png = render()
        with self._lock:
            self._items[key] = (now + self.ttl, png)
            if len(self._items) > 256:
                for stale in [k for k, (until, _) in self._items.items() if until <= now]:
                    del self._items[stale]
        return png


def render_chart(
    name: str, engine: Engine, catalog: ErrorCatalog, merchant_id: str, zone: ZoneInfo, now: datetime, days: int
) -> bytes:
    """The PNG of chart ``name`` for a merchant's last ``days`` days; UnknownChartError for other names."""
    if name not in CHARTS:
        raise UnknownChartError(f"no chart named {name!r}: use one of {', '.join(CHARTS)}")
    data = load_performance(engine, merchant_id, zone, now, days)
    with _DRAWING:
        if name == "funnel":
            return draw_funnel(data)
        if name == "recovery":
            return draw_recovery(data)
        if name == "retryability":
            return draw_retryability(data, catalog)
        return draw_heatmap(data)


def summary(data: PerformanceData) -> dict[str, Any]:
    """Headline numbers over the period: orders, closed, recovered, rate, recovered GMV (main currency)."""
    _days, _rates, gmv, currency = recovery_by_day(data)
    closed = sum(1 for row in data.orders if row["state"] in {"SUCCEEDED", "FAILED"})
    won = sum(1 for row in data.orders if row["state"] == "SUCCEEDED")
    return {
        "orders": len(data.orders),
        "open": sum(1 for row in data.orders if row["state"] in {"PENDING", "AWAITING_AGENT"}),
        "closed": closed,
        "recovered": won,
        "rate": won / closed if closed else None,
        "gmv": sum(gmv),
        "currency": currency,
        "links": sum(1 for row in data.nudges if row["status"] == "accepted"),
    }

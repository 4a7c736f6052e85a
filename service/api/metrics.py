"""Prometheus metrics of the decision API, on a registry per app (so several apps in one test process coexist).

The workers of one ``winback serve`` share its port, so a scrape reaches whichever worker accepts it: figures of
one worker alone would jump between workers (a counter read 28, then 12, then 28 again: Prometheus takes every
drop for a restart). With several workers the command gives them one folder, ``PROMETHEUS_MULTIPROC_DIR``
(prometheus_client's multiprocess mode, chosen when it is first imported), and every worker's ``/metrics`` answers
the figures of all of them: counters and histograms summed (those of a worker that ended included, so totals never
go back), gauges as each one's ``multiprocess_mode`` says, over the live workers.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    values,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from model.requests import Decision

__all__ = ["CONTENT_TYPE_LATEST", "MAX_NEW_PAIRS", "OTHER_CONNECTOR", "ApiMetrics"]

#: Most distinct new (connector, code) pairs a worker remembers for the pairs gauge.
MAX_NEW_PAIRS = 10_000
#: Label of connectors the merchant config and catalog do not know.
OTHER_CONNECTOR = "other"

#: prometheus_client's variable naming the folder its multiprocess mode writes (read when it is first imported).
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class _Children:
    """A labelled metric's children by label values, each looked up once: ``labels()`` takes a lock and builds
    its key on every call, and the request path counts several series per decision."""

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._by_labels: dict[tuple[str, ...], Any] = {}

    def __call__(self, *labels: str) -> Any:
        child = self._by_labels.get(labels)
        if child is None:
            child = self._by_labels[labels] = self._metric.labels(*labels)
        return child


class ApiMetrics:
    """The API's metrics: latency, decisions by action/strategy/channel, rule firings, unknown codes, model."""

    def __init__(self, connectors: Iterable[str] = ()) -> None:
        # The *_created series double the output and nobody reads them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        self.latency = Histogram(
            "winback_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template and status code.",
            ["method", "route", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.decisions = Counter(
            "winback_decisions",
            "Decisions served, by action, retry strategy and retarget channel.",
            ["action", "strategy", "channel", "model_version"],
            registry=self.registry,
        )
        self.rule_firings = Counter(
            "winback_rule_firings",
            "Hard rules that constrained a decision, by rule name.",
            ["rule"],
            registry=self.registry,
        )
        self.unknown_error_codes = Counter(
            "winback_unknown_error_codes",
            "Decisions for an error code the catalog has never seen (known_code False), by connector.",
            ["connector"],
            registry=self.registry,
        )
        self.new_error_codes = Counter(
            "winback_new_error_codes",
            "Decisions for an error code the serving model never trained on (the catalog decides when no model "
            "serves), by connector; connectors outside the merchant config and catalog count as 'other'.",
            ["connector"],
            registry=self.registry,
        )
        self.new_error_code_pairs = Gauge(
            "winback_new_error_code_pairs",
            f"Distinct never-trained-on (connector, error code) pairs a worker has seen (at most {MAX_NEW_PAIRS}; "
            "with several workers, the most any live one has seen).",
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.model_info = Gauge(
            "winback_model_info",
            "1 for the model version currently serving (rules-only when no model is loaded); with several workers, "
            "1 for each version a live worker serves, 0 for one they served before.",
            ["version"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.model_swaps = Counter("winback_model_swaps", "Times the serving model changed.", registry=self.registry)
        self.registry_errors = Counter(
            "winback_registry_errors", "Failed checks of the MLflow registry.", registry=self.registry
        )
        self._version: str | None = None
        # Figures read at scrape time (the executor's, from the database), not counted by this worker.
        self._read_at_scrape: list[Collector] = []
        # Set when prometheus_client writes its values to files (it chose so when imported, from the environment).
        self._multiprocess_dir = (
            os.environ.get(MULTIPROC_DIR_ENV) if values.ValueClass is not values.MutexValue else None
        )
        # Connector labels are bounded: a caller may send any connector name, the metrics only know these.
        self._connectors = frozenset(c.casefold() for c in connectors)
        self._new_pairs: set[bytes] = set()
        self._latency_of = _Children(self.latency)
        self._decisions_of = _Children(self.decisions)
        self._rule_firings_of = _Children(self.rule_firings)
        self._unknown_codes_of = _Children(self.unknown_error_codes)
        self._new_codes_of = _Children(self.new_error_codes)

    def observe_latency(self, method: str, route: str, status: int, seconds: float) -> None:
        """Time one HTTP request, by method, route template and status code."""
        self._latency_of(method, route, str(status)).observe(seconds)

    def observe_decision(self, decision: Decision) -> None:
        """Count one decision and the rules that constrained it."""
        self._decisions_of(
            decision.action.value,
            decision.strategy.value if decision.strategy else "",
            decision.channel.value if decision.channel else "",
            decision.model_version,
        ).inc()
        for rule in decision.rules_applied:
            # "max_retries:3" -> "max_retries": the rule's name, not its parameter, bounds the cardinality.
            self._rule_firings_of(rule.split(":", 1)[0]).inc()

    def connector_label(self, connector: str) -> str:
        """``connector`` when it is one the config or catalog knows (bounded cardinality), else ``"other"``."""
        key = connector.casefold()
        return key if key in self._connectors else OTHER_CONNECTOR

    def observe_error_code(self, connector: str, code: str | None, known_code: bool, support: int | None) -> None:
        """Count a decision's error code: unknown to the catalog, and new to the serving model.

        ``support`` is the serving model's training support for the code (None: no model, or it does not say;
        then a code is new when the catalog does not know it).
        """
        if code is None or not code.strip():
            # A failure without an error code (a connector that sends only the network's decline code) has no
            # code to be unknown or new: counted, every such decline raised the new-code alert.
            return
        new = (support == 0) if support is not None else not known_code
        if known_code and not new:
            return
        label = self.connector_label(connector)
        if not known_code:
            self._unknown_codes_of(label).inc()
        if not new:
            return
        self._new_codes_of(label).inc()
        # A digest, not the strings: a caller may send codes of any length, and the set keeps MAX_NEW_PAIRS of them.
        pair = hashlib.blake2b(f"{connector.casefold()}\0{code.casefold()}".encode(), digest_size=16).digest()
        if pair not in self._new_pairs and len(self._new_pairs) < MAX_NEW_PAIRS:
            self._new_pairs.add(pair)
            self.new_error_code_pairs.set(len(self._new_pairs))

    def set_model_version(self, version: str) -> None:
        """Mark ``version`` as the one serving; the previous version's series is removed."""
        if version == self._version:
            return
        if self._version is not None:
            # 0 first: in multiprocess mode the series stays in this worker's file, where removing does not reach.
            self.model_info.labels(self._version).set(0)
            self.model_info.remove(self._version)
            self.model_swaps.inc()
            # What is new is relative to the serving model: a fresh model starts a fresh count of distinct pairs.
            self._new_pairs.clear()
            self.new_error_code_pairs.set(0)
        self.model_info.labels(version).set(1)
        self._version = version

    def read_at_scrape(self, collector: Collector) -> None:
        """Answer ``collector``'s figures too (read when scraped: the same in every worker), in place of an earlier
        one of its kind (an app started again on the same runtime, as tests do)."""
        for earlier in [c for c in self._read_at_scrape if type(c) is type(collector)]:
            self._read_at_scrape.remove(earlier)
            self.registry.unregister(earlier)
        self._read_at_scrape.append(collector)
        self.registry.register(collector)

    def render(self) -> bytes:
        """The exposition text of this app's registry; in multiprocess mode, of every worker's files, with the
        figures read at scrape time."""
        if self._multiprocess_dir is None:
            return generate_latest(self.registry)
        forget_dead_workers(self._multiprocess_dir)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self._multiprocess_dir)  # type: ignore[no-untyped-call]
        for collector in self._read_at_scrape:
            merged.register(collector)
        return generate_latest(merged)


def forget_dead_workers(directory: str) -> None:
    """Remove the live-gauge files of worker processes that are gone (uvicorn replaced them, or they were
    stopped): their gauges no longer describe a worker that serves. Their counters stay, in other files."""
    for path in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
        pid = os.path.basename(path).removesuffix(".db").rsplit("_", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            mark_process_dead(int(pid), directory)  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True

"""Prometheus metrics of the executor's own work, on one registry per process.

A worker of ``winback executor run`` serves no HTTP: its figures reach a scrape through ``winback serve``'s
``/metrics`` when both run with the same ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode,
service/api/metrics.py, sums the counters of every process writing there); the serving process's own count is
appended to its ``/metrics`` otherwise.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

#: The executor's registry (module level: the counts are the process's, whatever Executor objects it builds).
EXECUTOR_REGISTRY = CollectorRegistry()

#: Charges an operator answered for as charged whose switch then said otherwise ("declined", or "not found" at the
#: one more ask): the order succeeded and its merchant shipped on a payment the switch does not have.
CHARGE_DISPUTES = Counter(
    "winback_executor_charge_disputes",
    "Charges an operator answered for as charged that their switch then reported declined or not found.",
    ["merchant_id", "switch_said"],
    registry=EXECUTOR_REGISTRY,
)

"""History generation: the world's failed orders played by the epsilon-greedy logging policy, as history tables.

``n_orders`` counts orders whose initial attempt failed: winback only ever sees failures, so every simulated
order starts with a failed ``initial`` attempt. The output is a pure function of (n_orders, seed, epsilon,
params): the same with one worker process or several, chunked any way.
"""

from __future__ import annotations

import multiprocessing
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass

import pandas as pd

from model.baselines import RuleBook
from model.merchant_config import MerchantConfig
from model.simulation.episodes import EpisodeTotals, run_episodes, totals_of
from model.simulation.logging_policy import EpsilonGreedyLoggingPolicy
from model.simulation.params import WorldParams
from model.simulation.world import World

DEFAULT_EPSILON = 0.15
_CHUNK = 5_000


@dataclass
class GeneratedHistory:
    """The simulated history (contract tables and the stops file), the per-order truth behind it, and the logging
    policy's totals."""

    attempts: pd.DataFrame
    nudges: pd.DataFrame
    per_order: pd.DataFrame  # one row per order with its latent cause and outcome (not part of the contract)
    totals: EpisodeTotals
    seconds: float
    stops: pd.DataFrame  # one row per logged stop decision (the optional stops file)

    @property
    def orders_per_second(self) -> float:
        return len(self.per_order) / self.seconds if self.seconds > 0 else float("inf")


@dataclass(frozen=True)
class _Job:
    seed: int
    n_total: int
    first: int
    count: int
    epsilon: float
    params: WorldParams | None
    merchants: Mapping[str, MerchantConfig] | None


@dataclass(frozen=True)
class HistoryPart:
    """Consecutive orders of a generated history: their attempts and nudges, per-order truth and rule audit."""

    attempts: pd.DataFrame
    nudges: pd.DataFrame
    per_order: pd.DataFrame
    violations: Counter[str]
    stops: pd.DataFrame


def _play_chunk(job: _Job) -> HistoryPart:
    world = World(job.seed, job.params, job.merchants, expected_orders=job.n_total)
    return _play(world, job)


def _play(world: World, job: _Job) -> HistoryPart:
    rulebook = RuleBook(world.configs, world.catalog)
    policy = EpsilonGreedyLoggingPolicy(rulebook, epsilon=job.epsilon, seed=job.seed)
    result = run_episodes(world, policy, job.count, first_order=job.first, record=True, rulebook=rulebook)
    assert result.attempts is not None
    assert result.nudges is not None
    assert result.stops is not None
    return HistoryPart(
        result.attempts, result.nudges, result.per_order, Counter(result.totals.violations_by_rule), result.stops
    )


def _check(n_orders: int, epsilon: float) -> None:
    if n_orders < 1:
        raise ValueError(f"the number of orders must be at least 1, got {n_orders}")
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"epsilon must be in [0, 1), got {epsilon}")


def iter_history_parts(
    n_orders: int,
    seed: int,
    *,
    epsilon: float = DEFAULT_EPSILON,
    workers: int = 1,
    params: WorldParams | None = None,
    merchants: Mapping[str, MerchantConfig] | None = None,
) -> Iterator[HistoryPart]:
    """The history of :func:`generate_history` as consecutive parts of up to 5,000 orders, in order.

    Only the parts being played and not yet consumed are in memory, so a history larger than memory can be
    written as it is produced (``pipelines.simulate``).
    """
    _check(n_orders, epsilon)
    jobs = [
        _Job(seed, n_orders, first, min(_CHUNK, n_orders - first), epsilon, params, merchants)
        for first in range(0, n_orders, _CHUNK)
    ]
    if workers > 1 and len(jobs) > 1:
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            pending: deque[Future[HistoryPart]] = deque()
            queued = iter(jobs)
            for job in queued:  # keep a few parts ahead of the consumer, not the whole history
                pending.append(pool.submit(_play_chunk, job))
                if len(pending) >= 2 * workers:
                    break
            while pending:
                part = pending.popleft().result()
                next_job = next(queued, None)
                if next_job is not None:
                    pending.append(pool.submit(_play_chunk, next_job))
                yield part
    else:
        world = World(seed, params, merchants, expected_orders=n_orders)
        for job in jobs:
            yield _play(world, job)


def generate_history(
    n_orders: int,
    seed: int,
    *,
    epsilon: float = DEFAULT_EPSILON,
    workers: int = 1,
    params: WorldParams | None = None,
    merchants: Mapping[str, MerchantConfig] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> GeneratedHistory:
    """Simulate ``n_orders`` failed orders (each starts with a failed attempt) under the logging policy.

    ``workers > 1`` plays chunks of orders in that many processes; the result is identical to one process.
    ``on_progress`` gets the number of orders done so far.
    """
    _check(n_orders, epsilon)
    started = time.perf_counter()
    parts: list[HistoryPart] = []
    done = 0
    for part in iter_history_parts(
        n_orders, seed, epsilon=epsilon, workers=workers, params=params, merchants=merchants
    ):
        parts.append(part)
        done += len(part.per_order)
        if on_progress is not None:
            on_progress(done)
    attempts = pd.concat([p.attempts for p in parts], ignore_index=True)
    nudges = pd.concat([p.nudges for p in parts], ignore_index=True)
    orders = pd.concat([p.per_order for p in parts], ignore_index=True)
    violations: Counter[str] = Counter()
    for part in parts:
        violations.update(part.violations)
    return GeneratedHistory(
        attempts=attempts,
        nudges=nudges,
        per_order=orders,
        totals=totals_of(orders, violations),
        seconds=time.perf_counter() - started,
        stops=pd.concat([p.stops for p in parts], ignore_index=True),
    )

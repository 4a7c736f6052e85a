"""A synthetic world of failed payments: history generation, episodes against any policy, an outcome model.

- ``World(seed)``: merchants (from data/demo/merchants.yaml), customers, instruments, connectors with health
  and fees, and the failed orders, deterministic by seed;
- ``run_episodes(world, policy, n_orders)``: play orders against any ``policy(request) -> Decision`` and total
  recovered GMV, costs, nudges and rule violations;
- ``generate_history(n_orders, seed)``: the history files' tables, played by the epsilon-greedy logging policy
  (``iter_history_parts``: the same in parts, for histories larger than memory);
- ``World.outcomes`` (``OutcomeModel``): per-attempt outcomes, also for a sandbox connector
  (``sandbox_attempt``).
"""

from model.simulation.episodes import EpisodeResult, EpisodeTotals, run_episodes
from model.simulation.generate import (
    DEFAULT_EPSILON,
    GeneratedHistory,
    HistoryPart,
    generate_history,
    iter_history_parts,
)
from model.simulation.logging_policy import EpsilonGreedyLoggingPolicy
from model.simulation.outcomes import AttemptResult, OutcomeModel
from model.simulation.params import WorldParams
from model.simulation.world import World

__all__ = [
    "DEFAULT_EPSILON",
    "AttemptResult",
    "EpisodeResult",
    "EpisodeTotals",
    "EpsilonGreedyLoggingPolicy",
    "GeneratedHistory",
    "HistoryPart",
    "OutcomeModel",
    "World",
    "WorldParams",
    "generate_history",
    "iter_history_parts",
    "run_episodes",
]

"""Operator tasks of the console that run outside the web process: creating agents."""

from __future__ import annotations

from pathlib import Path

from model.merchant_config import load_config
from service.api.settings import DEMO_CONFIG
from service.console.auth import Agent, AgentError, add_agent
from service.executor.store import make_executor_engine
from service.migrations import upgrade

#: Where ``winback console add-agent`` reads the password when it is not typed at a prompt.
PASSWORD_ENV = "WINBACK_AGENT_PASSWORD"


def create_agent(
    database_url: str, merchant_id: str, name: str, password: str, config_path: Path | None = None
) -> Agent:
    """Migrate the database and store a new agent of ``merchant_id`` (which must be in the merchant config).

    AgentError names the problem: unknown merchant, bad name, weak password, name taken.
    """
    config = load_config(config_path or DEMO_CONFIG)
    if merchant_id not in config.merchants:
        known = ", ".join(sorted(config.merchants))
        raise AgentError(f"unknown merchant {merchant_id!r}: the merchant config has {known}")
    engine = make_executor_engine(database_url)
    try:
        upgrade(engine)
        return add_agent(engine, merchant_id, name, password)
    finally:
        engine.dispose()


def ensure_demo_agent(database_url: str, merchant_id: str, name: str, password: str) -> Agent:
    """Migrate the database and make ``name``/``password`` sign in for ``merchant_id`` (created or reset).

    For ``make demo``: the demo prints these credentials next to the console URL.
    """
    from service.console.auth import ensure_agent

    engine = make_executor_engine(database_url)
    try:
        upgrade(engine)
        return ensure_agent(engine, merchant_id, name, password)
    finally:
        engine.dispose()

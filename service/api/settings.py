"""Settings of the decision API process: one ``Settings`` object, read from ``WINBACK_*`` variables (or .env)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.datafiles import DEMO_MERCHANTS_FILE

#: The shipped demo merchant config (CONTRACT.md section 1: ``--config`` defaults to it).
DEMO_CONFIG = DEMO_MERCHANTS_FILE
DEFAULT_DATABASE_URL = "sqlite:///winback.db"
DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the local store of CONTRACT.md section 1."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


#: Most decision requests one ``POST /v1/decisions:batch`` may carry, unless ``WINBACK_MAX_BATCH`` says otherwise.
MAX_BATCH = 1000


class Settings(BaseSettings):
    """Everything the API process needs to start; built once in the app factory, never at import."""

    model_config = SettingsConfigDict(env_prefix="WINBACK_", env_file=".env", extra="ignore", frozen=True)

    config_path: Path = Field(default=DEMO_CONFIG, description="Merchant config YAML (CONTRACT.md section 4).")
    tracking_uri: str = Field(default_factory=default_tracking_uri, description="MLflow tracking/registry URI.")
    database_url: str = Field(default=DEFAULT_DATABASE_URL, description="SQLAlchemy URL for decisions/outcomes.")
    model_poll_seconds: float = Field(default=10.0, gt=0, le=30, description="How often to check @champion.")
    load_model: bool = Field(default=True, description="False: never touch MLflow, serve rules-only.")
    run_migrations: bool = Field(default=True, description="Upgrade the database schema at start-up.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_decisions: bool = Field(default=True, description="One JSON log line per decision served.")
    decision_flush_seconds: float = Field(
        default=0.2, gt=0, le=2, description="Write-behind interval of decisions (stored at most this far behind)."
    )
    spool_dir: Path = Field(
        default=Path("winback-spool"),
        description="Where decisions wait on disk while the database is away (stored when it is back).",
    )
    max_batch: int = Field(default=MAX_BATCH, ge=1, description="Most requests accepted by /v1/decisions:batch.")
    seed: int | None = Field(default=None, description="Seed of the exploration RNG (None: fresh entropy).")
    gc_freeze: bool = Field(
        default=True,
        description="After start-up (model loaded), move every object alive then out of the cyclic garbage "
        "collector's reach (gc.freeze): its full passes would otherwise walk them, ~0.2 s with the GIL held.",
    )
    gsm_overlay: Path | None = Field(
        default=None, description="Gateway status map overlay (winback codes import-gsm) for codes the catalog lacks."
    )

    @field_validator("database_url", "tracking_uri")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


class SettingsError(ValueError):
    """A ``WINBACK_*`` variable (or .env entry) the API's settings cannot take, named with its value."""


def load_settings() -> Settings:
    """``Settings()`` from the environment; SettingsError naming each variable it refuses, with the reason."""
    try:
        return Settings()
    except ValidationError as error:
        problems = [
            f"WINBACK_{'_'.join(str(part) for part in problem['loc']).upper()}={problem['input']!r}: {problem['msg']}"
            for problem in error.errors()
        ]
        raise SettingsError("; ".join(problems)) from None

"""Settings of the decision API process: one ``Settings`` object, read from ``WINBACK_*`` variables (or .env)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.datafiles import DEMO_MERCHANTS_FILE
from model.gsm import GsmOverlaySetting

#: The shipped demo merchant config (CONTRACT.md section 1: ``--config`` defaults to it).
DEMO_CONFIG = DEMO_MERCHANTS_FILE
DEFAULT_DATABASE_URL = "sqlite:///winback.db"
DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the local store of CONTRACT.md section 1."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


#: Most decision requests one ``POST /v1/decisions:batch`` may carry, unless ``WINBACK_MAX_BATCH`` says otherwise.
MAX_BATCH = 1000
#: The slowest champion poll: a version promoted just after a poll serves a poll, a second (a worker's look at the
#: mirror), a download and a load later (measured at a 20 s poll: 12-21 s); CONTRACT.md gives the switch 30 s.
MAX_MODEL_POLL_SECONDS = 20.0


class Settings(GsmOverlaySetting):
    """Everything the API process needs to start; built once in the app factory, never at import."""

    model_config = SettingsConfigDict(env_prefix="WINBACK_", env_file=".env", extra="ignore", frozen=True)

    config_path: Path = Field(default=DEMO_CONFIG, description="Merchant config YAML (CONTRACT.md section 4).")
    tracking_uri: str = Field(default_factory=default_tracking_uri, description="MLflow tracking/registry URI.")
    database_url: str = Field(default=DEFAULT_DATABASE_URL, description="SQLAlchemy URL for decisions/outcomes.")
    model_poll_seconds: float = Field(
        default=10.0,
        gt=0,
        le=MAX_MODEL_POLL_SECONDS,
        description="How often to check @champion. A moved alias serves after this, a second and the download and "
        "load (a few seconds): at most 20, so the 30 s switch of CONTRACT.md holds.",
    )
    load_model: bool = Field(default=True, description="False: never touch MLflow, serve rules-only.")
    model_mirror_dir: Path | None = Field(
        default=None,
        description="Read the champion from this folder, mirrored by the serving command (api/mirror.py), instead "
        "of asking MLflow: `winback serve` sets it for its workers.",
    )
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

    @field_validator("database_url", "tracking_uri")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


class SettingsError(ValueError):
    """``WINBACK_*`` variables (or .env entries) a process's settings cannot take: ``problems`` names each with its
    value and the reason."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def settings_from_env(settings_class: type[SettingsT], **values: Any) -> SettingsT:
    """``settings_class(**values)``, the rest from ``WINBACK_*`` variables; SettingsError naming each variable it
    refuses with its value and the reason, in one line (pydantic's own message spans lines and names fields, not
    variables). A rule over several variables (a placeholder secret outside dev) gives its own sentence."""
    try:
        return settings_class(**values)
    except ValidationError as error:
        raise SettingsError([_problem(problem) for problem in error.errors()]) from None


def _problem(problem: Mapping[str, Any]) -> str:
    if not problem["loc"]:  # a model validator's own message, which names the variables
        return str(problem["msg"]).removeprefix("Value error, ")
    variable = "WINBACK_" + "_".join(str(part) for part in problem["loc"]).upper()
    shown = "'***'" if "SECRET" in variable else repr(problem["input"])  # a secret is never printed
    return f"{variable}={shown}: {problem['msg']}"


def load_settings() -> Settings:
    """The API's ``Settings`` from the environment (``settings_from_env``)."""
    return settings_from_env(Settings)

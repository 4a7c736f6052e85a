"""Settings of the agent console (served by the API process): ``WINBACK_*`` variables, built on first use."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The session-signing secret used when none is set: fine on a laptop, refused anywhere else.
PLACEHOLDER_CONSOLE_SECRET = "dev-only-console-secret-change-me"
MIN_SECRET_LENGTH = 32


class ConsoleSettings(BaseSettings):
    """Sessions, sign-in throttling and chart caching of the console; one object per process."""

    model_config = SettingsConfigDict(env_prefix="WINBACK_", env_file=".env", extra="ignore", frozen=True)

    env: Literal["dev", "test", "prod"] = Field(default="dev", description="Deployment kind; dev allows demo secrets.")
    console_secret: SecretStr = Field(
        default=SecretStr(PLACEHOLDER_CONSOLE_SECRET), description="HMAC key that signs the console's cookies."
    )
    session_hours: float = Field(default=12.0, gt=0, description="A session ends this long after sign-in.")
    session_idle_minutes: float = Field(default=60.0, gt=0, description="A session ends after this long unused.")
    cookie_secure: bool | None = Field(
        default=None, description="Force the Secure cookie flag (None: set it when the request came over https)."
    )
    login_max_failures: int = Field(
        default=5,
        ge=1,
        description="Failed sign-ins per agent name per window (counted in the database, for all workers).",
    )
    login_max_failures_per_ip: int = Field(default=20, ge=1, description="Failed sign-ins per client per window.")
    login_window_minutes: float = Field(default=15.0, gt=0, description="Window of the failed sign-in limits.")
    chart_cache_seconds: float = Field(default=60.0, ge=0, description="How long a rendered chart is reused.")
    queue_limit: int = Field(default=200, ge=1, le=5000, description="Most orders shown on the queue page.")

    @model_validator(mode="after")
    def _real_secret_outside_dev(self) -> ConsoleSettings:
        secret = self.console_secret.get_secret_value()
        if self.env != "dev" and (secret == PLACEHOLDER_CONSOLE_SECRET or len(secret) < MIN_SECRET_LENGTH):
            raise ValueError(
                f"WINBACK_CONSOLE_SECRET must be set to a random string of at least {MIN_SECRET_LENGTH} characters "
                f"outside dev (WINBACK_ENV={self.env}); the placeholder signs sessions anyone could forge"
            )
        return self

"""Settings of the executor (its HTTP routes in the API process, and the workers): ``WINBACK_*`` variables."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from model.gsm import GsmOverlaySetting
from service.api.settings import DEFAULT_DATABASE_URL, DEMO_CONFIG

#: The link secret used when none is set: fine on a laptop, refused anywhere else.
PLACEHOLDER_LINK_SECRET = "dev-only-link-secret-change-me"
MIN_SECRET_LENGTH = 32


class ExecutorSettings(GsmOverlaySetting):
    """Everything the executor needs besides the merchant config; built once per process, never at import."""

    model_config = SettingsConfigDict(env_prefix="WINBACK_", env_file=".env", extra="ignore", frozen=True)

    env: Literal["dev", "test", "prod"] = Field(default="dev", description="Deployment kind; dev allows demo secrets.")
    config_path: Path = Field(default=DEMO_CONFIG, description="Merchant config YAML (CONTRACT.md section 4).")
    database_url: str = DEFAULT_DATABASE_URL
    link_secret: SecretStr = Field(default=SecretStr(PLACEHOLDER_LINK_SECRET), description="HMAC key of pay links.")
    link_secret_previous: SecretStr | None = Field(
        default=None,
        description="The link secret before a rotation: links it signed are still accepted until they expire "
        "(and, while WINBACK_PROVIDER_CALLBACK_SECRET is unset, callback URLs derived from it too).",
    )
    public_base_url: str = Field(default="http://127.0.0.1:8000", description="Where customers reach /pay/{token}.")
    provider_callback_secret: SecretStr | None = Field(
        default=None,
        description="HMAC key of the providers' callback URL tokens: required in prod, apart from the link secret "
        "(unset in dev and test: derived from the link secret).",
    )
    provider_callback_secret_previous: SecretStr | None = Field(
        default=None,
        description="The callback secret before a rotation: callback URLs it made are still accepted, so STOP "
        "replies keep arriving while the providers are given the new URLs (the link secret, when the key was derived "
        "from it).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Level of the workers' log lines (the scorer's WINBACK_LOG_LEVEL too)."
    )
    sandbox_url: str | None = Field(default=None, description="Sandbox connector for connectors without endpoint.")
    lease_seconds: float = Field(default=30.0, gt=0, description="How long a claimed action is a worker's own.")
    batch_size: int = Field(default=50, ge=1, le=5000)
    poll_seconds: float = Field(default=0.5, gt=0, description="Idle wait between claims when nothing is due.")
    max_attempts: int = Field(default=8, ge=1, description="Tries of a connector or provider call before dead.")
    webhook_alert_attempts: int = Field(
        default=20,
        ge=1,
        description="Tries of a merchant webhook after which its failing is logged as an error (it is re-sent, "
        "hourly at most, until a 2xx).",
    )
    backoff_base_seconds: float = Field(default=2.0, gt=0)
    backoff_cap_seconds: float = Field(default=3600.0, gt=0)
    clock_speed: float = Field(
        default=1.0, ge=1.0, description="Demo clock: executor seconds per real second (1 = the wall clock; dev only)."
    )
    clock_origin: float | None = Field(
        default=None, description="Unix time at which the demo clock equals the wall clock (with clock_speed)."
    )

    def callback_key(self) -> bytes:
        """The HMAC key of provider callback tokens (see ``service.executor.optouts.callback_token``)."""
        return self.callback_keys()[0]

    def callback_keys(self) -> tuple[bytes, ...]:
        """The keys whose callback tokens are accepted: the current one first, then the one before a rotation of
        the callback secret (or, while the callback key derives from the link secret, of the link secret)."""
        from service.executor.optouts import callback_key

        current = _value(self.provider_callback_secret)
        keys = [callback_key(current, self.link_secret.get_secret_value())]
        previous = _value(self.provider_callback_secret_previous)
        if previous:
            keys.append(callback_key(previous, ""))
            # And the key a link secret of that value derives: the switch from a derived key to an independent
            # secret sets the old link secret here, so the URLs the providers have keep working meanwhile.
            keys.append(callback_key(None, previous))
        old_link_secret = _value(self.link_secret_previous)
        if current is None and old_link_secret:
            keys.append(callback_key(None, old_link_secret))
        return tuple(dict.fromkeys(keys))

    def unsubscribe_keys(self) -> tuple[bytes, ...]:
        """The keys whose e-mail unsubscribe links are accepted: the current link secret's first, then the
        previous one's (links in e-mails already sent keep working through a rotation)."""
        from service.executor.optouts import unsubscribe_key

        secrets = (self.link_secret.get_secret_value(), *self.link_secrets_previous())
        return tuple(dict.fromkeys(unsubscribe_key(secret) for secret in secrets))

    def link_secrets_previous(self) -> tuple[str, ...]:
        """The link secrets before a rotation whose links are still accepted (none, or ``link_secret_previous``)."""
        old = _value(self.link_secret_previous)
        return (old,) if old else ()

    def clock(self) -> Callable[[], datetime]:
        """The executor's clock: the wall clock, or (``clock_speed`` > 1) a demo clock that runs faster from
        ``clock_origin``, so schedules of hours and days play out in minutes. Every process of one demo must
        share the same speed and origin."""
        if self.clock_speed == 1.0:
            from service.executor.store import utcnow

            return utcnow
        origin = self.clock_origin if self.clock_origin is not None else time.time()
        speed = self.clock_speed

        def demo_clock() -> datetime:
            return datetime.fromtimestamp(origin + (time.time() - origin) * speed, UTC)

        return demo_clock

    @model_validator(mode="after")
    def _real_secret_outside_dev(self) -> ExecutorSettings:
        secret = self.link_secret.get_secret_value()
        if self.env != "dev" and (secret == PLACEHOLDER_LINK_SECRET or len(secret) < MIN_SECRET_LENGTH):
            raise ValueError(
                f"WINBACK_LINK_SECRET must be set to a random string of at least {MIN_SECRET_LENGTH} characters "
                f"outside dev (WINBACK_ENV={self.env}); the placeholder signs links anyone could forge"
            )
        for name, value, what in (
            ("WINBACK_PROVIDER_CALLBACK_SECRET", self.provider_callback_secret,
             "it authenticates the STOP replies and delivery receipts of providers"),
            ("WINBACK_LINK_SECRET_PREVIOUS", self.link_secret_previous, "links it signed are still accepted"),
            ("WINBACK_PROVIDER_CALLBACK_SECRET_PREVIOUS", self.provider_callback_secret_previous,
             "callbacks it authenticates are still accepted"),
        ):  # fmt: skip
            if self.env != "dev" and value is not None and len(value.get_secret_value()) < MIN_SECRET_LENGTH:
                raise ValueError(
                    f"{name} must be at least {MIN_SECRET_LENGTH} characters outside dev (WINBACK_ENV={self.env}): "
                    f"{what}"
                )
        if self.env == "prod":
            self._independent_callback_secret()
        if self.env != "dev" and self.clock_speed != 1.0:
            raise ValueError(
                f"WINBACK_CLOCK_SPEED={self.clock_speed} runs the executor on a fast demo clock; it is allowed only "
                f"with WINBACK_ENV=dev (got {self.env})"
            )
        return self

    def _independent_callback_secret(self) -> None:
        """In prod the providers' callbacks (STOP replies, delivery receipts) need a key of their own: derived from
        the link secret, or equal to it, one leaked secret would also let anyone post opt-outs and receipts."""
        current = _value(self.provider_callback_secret)
        if current is None or current == self.link_secret.get_secret_value():
            raise ValueError(
                "WINBACK_PROVIDER_CALLBACK_SECRET must be set, apart from WINBACK_LINK_SECRET, with WINBACK_ENV=prod: "
                "it authenticates the STOP replies and delivery receipts of providers. Switching from the key derived "
                "from the link secret: set WINBACK_PROVIDER_CALLBACK_SECRET_PREVIOUS to the link secret too, give "
                "the providers the URLs `winback executor callback-url` prints, then unset it"
            )


def _value(secret: SecretStr | None) -> str | None:
    """The secret's value, None when unset or empty."""
    return secret.get_secret_value() or None if secret is not None else None

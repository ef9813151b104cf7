"""Process configuration: pydantic-settings, every variable prefixed ``RELIEVER_``.

No module-level instance: code receives a :class:`Settings` (or the runtime built from
one); :func:`get_settings` caches the one built from the environment.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_FLOWER_AUTH = "admin:admin"


class Settings(BaseSettings):
    """Everything a reliever process reads from its environment."""

    model_config = SettingsConfigDict(
        env_prefix="RELIEVER_", env_file=".env", env_ignore_empty=True, extra="ignore"
    )

    environment: Literal["development", "test", "production"] = "development"
    redis_url: str = "redis://127.0.0.1:6379/0"
    broker_url: str | None = None
    result_backend: str | None = None
    agents_file: str = "agents.yaml"
    key_prefix: str = Field("reliever", pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
    queue: str = "reliever"
    event_ttl: int = Field(86_400, gt=0, description="seconds a job's replay log lives")
    max_job_bytes: int = Field(1_000_000, gt=0)
    max_sse_event_bytes: int = Field(
        1_000_000, gt=0, description="a longer line or event from an upstream fails the attempt"
    )
    max_completion_bytes: int = Field(
        1_000_000, gt=0, description="a longer completion (text, tool calls) fails the attempt"
    )
    sentry_dsn: SecretStr | None = None
    flower_basic_auth: SecretStr = SecretStr(DEFAULT_FLOWER_AUTH)
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="first port tried for a worker's /metrics; unset = off"
    )
    metrics_port_tries: int = Field(
        16, ge=1, le=1024, description="the next ports tried when one is taken (one per process)"
    )
    metrics_host: str = "127.0.0.1"
    traces_exporter: Literal["none", "console", "otlp"] = "none"
    otlp_endpoint: str | None = Field(
        None, description="OTLP/HTTP traces URL; unset = the OTEL_EXPORTER_OTLP_* variables"
    )
    redis_max_connections: int = Field(
        1000, gt=0, description="connections a worker process may open to REDIS_URL"
    )
    lease_ttl_s: float = Field(15.0, gt=0, description="a running job's lease; renewed every third")
    visibility_timeout_s: int = Field(
        3600, gt=0, description="broker redelivery of unacked messages: the last resort"
    )
    unacked_restore_interval_s: int = Field(
        10, gt=0, description="how often a worker sweeps unacked messages past the timeout"
    )
    result_expires_s: int = Field(86_400, gt=0)
    drain_s: float = Field(
        20.0,
        ge=0,
        description="on SIGTERM, how long running jobs may finish before they are handed off",
    )
    delta_flush_ms: int = Field(
        0, ge=0, description="hold deltas this long to merge more; 0 = merge only what queues"
    )

    @field_validator("redis_url", "broker_url", "result_backend")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("expected a redis://, rediss:// or unix:// URL")
        return value

    @model_validator(mode="after")
    def _defaults_and_safety(self) -> Settings:
        if self.broker_url is None:
            self.broker_url = self.redis_url
        if self.result_backend is None:
            self.result_backend = self.redis_url
        weak_auth = self.flower_basic_auth.get_secret_value() in ("", DEFAULT_FLOWER_AUTH)
        if self.environment == "production" and weak_auth:
            raise ValueError(
                "RELIEVER_FLOWER_BASIC_AUTH must be set to user:password in production"
            )
        return self

    @property
    def loopback_only(self) -> bool:
        """Tests may only reach providers on this machine."""
        return self.environment == "test"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def describe_errors(exc: ValidationError) -> str:
    """One line naming each bad variable and what is wrong with it."""
    return "; ".join(
        (f"RELIEVER_{'_'.join(str(p) for p in e['loc']).upper()}: " if e["loc"] else "")
        + e["msg"].removeprefix("Value error, ")
        for e in exc.errors()
    )

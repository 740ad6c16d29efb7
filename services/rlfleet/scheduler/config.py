"""Settings of the scheduler process (env prefix ``RLFLEET_SCHEDULER_``)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from rlfleet.common.config import ServiceConfig
from rlfleet.scheduler.discovery import parse_addresses


class SchedulerConfig(ServiceConfig):
    """rlfleet scheduler: jobs, the rollout pool and the step loop."""

    service_name: ClassVar[str] = "scheduler"
    model_config = SettingsConfigDict(
        env_prefix="RLFLEET_SCHEDULER_",
        extra="forbid",
        env_nested_delimiter="__",
        use_attribute_docstrings=True,  # the docstrings below become --help text
    )

    discovery: Literal["static"] = "static"
    """How rollout replicas are found: static (the rollout_addresses list)."""
    rollout_addresses: str = ""
    """Rollout replicas as comma-separated host:port (discovery = static)."""
    reward_address: str = ""
    """host:port of the reward service."""
    trainer_address: str = ""
    """host:port of the trainer service."""
    weightsync_address: str = ""
    """host:port of weight-sync, passed to replicas in LoadVersion (empty: their own setting)."""
    status_timeout_s: float = Field(default=5.0, gt=0)
    """Timeout of a replica's GetStatus and Abort calls."""
    init_timeout_s: float = Field(default=1800.0, gt=0)
    """Timeout of trainer InitJob (loads the model and publishes version 0)."""
    generate_timeout_s: float = Field(default=3600.0, gt=0)
    """Timeout of one Generate stream (all sequences a replica gets in a step)."""
    score_timeout_s: float = Field(default=600.0, gt=0)
    """Timeout of one reward Score call."""
    train_timeout_s: float = Field(default=3600.0, gt=0)
    """Timeout of one trainer TrainStep call."""
    load_timeout_s: float = Field(default=600.0, gt=0)
    """Timeout of a replica's LoadVersion call."""
    retry_deadline_s: float = Field(default=120.0, gt=0)
    """How long reward and trainer calls are retried on retryable codes before the job fails."""
    replica_retry_s: float = Field(default=5.0, ge=0)
    """How long a replica call is retried before the replica is dropped for the step."""
    score_batch_size: int = Field(default=256, ge=1)
    """Samples per Score call."""
    poll_interval_s: float = Field(default=1.0, gt=0)
    """How often the idle worker looks for queued jobs."""

    @model_validator(mode="after")
    def _addresses_given(self) -> SchedulerConfig:
        missing = [
            name for name in ("reward_address", "trainer_address") if not getattr(self, name)
        ]
        if self.discovery == "static" and not self.rollout_list:
            missing.append("rollout_addresses")
        if missing:
            raise ValueError(f"set {', '.join(missing)} (host:port of each service)")
        return self

    @property
    def rollout_list(self) -> list[str]:
        return parse_addresses(self.rollout_addresses)

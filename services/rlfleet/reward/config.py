"""Settings of the reward service (``python -m rlfleet.reward``)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from rlfleet.common.config import ServiceConfig


class RewardConfig(ServiceConfig):
    """Reward service: verifiers that score trajectories and write them to the buffer."""

    model_config = SettingsConfigDict(env_prefix="RLFLEET_REWARD_")
    service_name: ClassVar[str] = "reward"

    buffer_kind: Literal["redis"] = "redis"
    """Experience buffer implementation (Redis Streams at redis_url)."""
    buffer_max_len: int = Field(default=100_000, ge=0)
    """Unconsumed samples a job's stream may hold before Score is refused with
    RESOURCE_EXHAUSTED (backpressure); 0 means unbounded."""
    max_workers: int = Field(default=8, ge=1, le=512)
    """Threads that run verifiers; shared by all concurrent Score calls."""
    score_timeout_s: float = Field(default=120.0, gt=0)
    """Deadline for scoring one batch; samples still running after it score 0."""
    grpc_workers: int = Field(default=16, ge=1, le=1024)
    """Threads that serve gRPC calls."""

"""Settings of the environment service (``python -m rlfleet.env``)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from rlfleet.common.config import ServiceConfig


class EnvConfig(ServiceConfig):
    """Environment service: multi-turn episodes (tool calls in a sandbox, feedback turns)."""

    model_config = SettingsConfigDict(env_prefix="RLFLEET_ENV_")
    service_name: ClassVar[str] = "env"

    max_episodes: int = Field(default=10_000, ge=1, le=10_000_000)
    """Episodes held in memory at once. When full, expired and then the oldest finished
    ones make room; with none finished, Reset is refused with RESOURCE_EXHAUSTED."""
    episode_ttl_s: float = Field(default=3600.0, gt=0)
    """An episode untouched (no Reset/Step) this long is dropped: a Step then is NOT_FOUND."""
    max_turns: int = Field(default=256, ge=1, le=100_000)
    """Hard limit of model turns per episode, whatever the environment says: at this turn
    the episode ends (done, info truncated = true, finish = "turn_limit")."""
    max_model_text_chars: int = Field(default=1_000_000, ge=1)
    """Longer model turns are refused with INVALID_ARGUMENT."""
    grpc_workers: int = Field(default=32, ge=1, le=1024)
    """Threads that serve gRPC calls; a Step holds one while its tools run."""
    sandbox_uid_base: int = Field(default=61000, ge=1000)
    """When the service runs as root: the python tool runs as uid sandbox_uid_base + slot.
    Keep it apart from the reward service's (RLFLEET_SANDBOX_UID_BASE, 60000): process
    limits count per uid."""
    sandbox_slots: int = Field(default=16, ge=1, le=1024)
    """Python tool runs at once; more wait for a free slot."""
    preload: bool = True
    """Import the verifiers' heavy dependencies (math-verify, sympy) at start, not in the
    first Step."""

"""Settings of the weight-sync service (``python -m rlfleet.weightsync``)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from rlfleet.common.config import ServiceConfig


class WeightSyncConfig(ServiceConfig):
    """Weight-sync service: receives policy versions, verifies them, serves them to replicas."""

    model_config = SettingsConfigDict(env_prefix="RLFLEET_WEIGHTSYNC_")
    service_name: ClassVar[str] = "weightsync"

    spool_dir: str = ""
    """Directory where versions are kept: each is received into a file here and served
    from a shared mapping of it (page cache, not weight-sync's anonymous memory), fsynced
    in the background, and a restarted weight-sync serves the same versions again.
    Empty keeps versions in anonymous memory only."""
    keep_versions: int = Field(default=2, ge=1, le=1000)
    """Versions kept per job, counting the one arriving: when a push starts and this
    many are held, the oldest one no replica is pulling is evicted first (its spool
    file removed). 1 evicts the current version when the next starts to arrive."""
    evict_wait_s: float = Field(default=60.0, ge=0)
    """How long a push waits for room when every version it could evict is being pulled
    (or another push of the job is arriving); then it is refused with UNAVAILABLE, which
    clients retry."""
    memory_limit_mb: int = Field(default=0, ge=0)
    """Memory weight-sync may use, in MiB, when its cgroup sets no limit
    (/sys/fs/cgroup/memory.max); 0: no check then. A job whose versions do not fit
    (without a spool: keep_versions × its size + memory_overhead_mb) is refused."""
    memory_overhead_mb: int = Field(default=512, ge=0)
    """Memory weight-sync needs besides the versions it keeps, in MiB (the budget check)."""
    chunk_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    """Bytes per WeightChunk served by PullVersion (must fit in max_message_mb)."""
    replica_registry: Literal["memory", "redis"] = "memory"
    """Where ReportHeld records live: memory, or Redis hashes rlfleet:ws:<job>:replicas
    at redis_url (they survive a restart of weight-sync)."""
    data_port: int = Field(default=0, ge=-1, le=65535)
    """TCP port of the weight data plane (pushes and pulls as raw bytes beside gRPC,
    several times faster for large models); 0 picks a free one, -1 turns it off.
    It is off when TLS is on: it does not encrypt, so clients then use gRPC."""
    max_version_mb: int = Field(default=256 * 1024, ge=1)
    """Largest version the data plane accepts, in MiB; a push announcing more is refused
    before any byte is sent."""
    grpc_workers: int = Field(default=32, ge=1, le=1024)
    """Threads that serve gRPC calls (each pull or push stream holds one)."""

    @model_validator(mode="after")
    def _chunk_fits_a_message(self) -> WeightSyncConfig:
        limit = self.max_message_mb * 1024 * 1024
        if self.chunk_bytes > limit - 64 * 1024:  # room for the other fields of the chunk
            raise ValueError(
                f"chunk_bytes ({self.chunk_bytes}) must be well below max_message_mb "
                f"({self.max_message_mb} MiB)"
            )
        return self

"""Settings of the trainer process (env prefix ``RLFLEET_TRAINER_``)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from rlfleet.common.config import ServiceConfig


class TrainerConfig(ServiceConfig):
    """The trainer: policy, optimizer, IcePop GRPO/PPO steps, checkpoints."""

    model_config = SettingsConfigDict(
        env_prefix="RLFLEET_TRAINER_", extra="forbid", env_nested_delimiter="__"
    )
    service_name: ClassVar[str] = "trainer"

    weightsync_address: str = ""
    """host:port of weight-sync; empty: new versions are not published (dry runs)."""
    checkpoint_dir: str = "checkpoints"
    """Root of the Hugging Face checkpoints: <checkpoint_dir>/<job_id>/step-<s>/."""
    consumer: str = Field(default="trainer-0", min_length=1)
    """Consumer name in the buffer's consumer group; keep it stable across restarts."""
    read_timeout_s: float = Field(default=120.0, gt=0)
    """How long a TrainStep waits for its samples to appear in the buffer."""
    reclaim_idle_s: float = Field(default=60.0, ge=0)
    """Entries pending on another consumer this long are taken over (it is presumed dead)."""
    push_timeout_s: float = Field(default=300.0, gt=0)
    """Per-attempt timeout of publishing one version to weight-sync."""
    gather_bucket_mb: int = Field(default=512, ge=1)
    """Publishing gathers the whole weights from the ranks' shards this many MiB at a time
    (the most of them any rank holds at once beside its shards and the payload)."""
    weight_group_host: str = "127.0.0.1"
    """The address replicas reach this trainer at for a job's weight group (the pod's IP
    in a cluster); the group's port is picked per group."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the policy lives; auto: cuda if available, else cpu."""
    torch_threads: int = Field(default=0, ge=0)
    """CPU threads for torch (per rank); 0 keeps torch's default."""
    ranks: int = Field(default=1, ge=1, le=1024)
    """Trainer ranks on this machine: the policy is sharded over them (FSDP2; NCCL on GPUs,
    gloo on CPU). This process is rank 0 and starts the others. Under torchrun (RANK and
    WORLD_SIZE set) the launcher's ranks are used instead and this is ignored."""

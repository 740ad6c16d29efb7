"""Settings of a rollout replica (``python -m rlfleet.rollout``)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from rlfleet.common.config import ServiceConfig


class RolloutConfig(ServiceConfig):
    """A rollout replica: an inference engine that samples completions for the scheduler."""

    model_config = SettingsConfigDict(env_prefix="RLFLEET_ROLLOUT_")
    service_name: ClassVar[str] = "rollout"

    replica_id: str = ""
    """Name this replica reports to weight-sync; empty: "<hostname>-<pid>"."""
    engine: Literal["torch"] = "torch"
    """Inference engine: torch (plain PyTorch + transformers)."""
    model_path: str = ""
    """Hugging Face model directory to load at start (version 0); empty: wait for LoadVersion."""
    device: str = "auto"
    """torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:1, ..."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and activations dtype; auto: bfloat16 on GPU, float32 on CPU."""
    weightsync_address: str = ""
    """host:port of weight-sync, used when a LoadVersion request names none."""
    advertise_address: str = ""
    """host:port other services reach this replica at; empty: "<host>:<bound port>"."""
    max_batch_seqs: int = Field(default=256, ge=1)
    """Most sequences decoded together; more wait in the queue."""
    max_prefill_tokens: int = Field(default=16384, ge=1)
    """Most (padded) prompt tokens prefilled in one forward pass."""
    torch_threads: int = Field(default=0, ge=0)
    """CPU threads torch may use; 0 keeps torch's default."""
    pull_timeout_s: float = Field(default=300.0, gt=0)
    """Deadline of one PullVersion stream from weight-sync, in seconds."""
    grpc_workers: int = Field(default=256, ge=4, le=4096)
    """Threads serving gRPC calls; each streaming Generate holds one, and Abort must
    still find a free one while they run, so keep it above the concurrent Generate calls."""
    abort_wait_s: float = Field(default=60.0, gt=0)
    """How long Abort waits for in-flight Generate calls to hand back their partials."""

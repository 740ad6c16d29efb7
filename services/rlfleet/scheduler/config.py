"""Settings of the scheduler process (env prefix ``RLFLEET_SCHEDULER_``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from rlfleet.common.config import ServiceConfig
from rlfleet.scheduler.auth import TOKENS_ENV
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

    discovery: Literal["static", "kubernetes"] = "static"
    """How rollout replicas are found: static (the rollout_addresses list) or kubernetes (Ready pods matching rollout_selector, through the Kubernetes API)."""
    rollout_addresses: str = ""
    """Rollout replicas as comma-separated host:port (discovery = static)."""
    rollout_namespace: str = ""
    """Namespace of the rollout pods (discovery = kubernetes); empty: the scheduler pod's own."""
    rollout_selector: str = ""
    """Label selector of the rollout pods, e.g. app.kubernetes.io/component=rollout (discovery = kubernetes)."""
    rollout_port: int = Field(default=50051, ge=1, le=65535)
    """gRPC port of the rollout pods; each replica is reached at <pod IP>:<port> (discovery = kubernetes)."""
    reward_address: str = ""
    """host:port of the reward service."""
    trainer_address: str = ""
    """host:port of the trainer service."""
    weightsync_address: str = ""
    """host:port of weight-sync, passed to replicas in LoadVersion (empty: their own setting)."""
    env_address: str = ""
    """host:port of the environment service (``rlfleet env``), for jobs with a
    ``task.environment``; empty: such jobs are refused."""
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
    http_port: int = Field(default=0, ge=0, le=65535)
    """Port of the REST API (jobs, events, /healthz, /metrics); 0 picks a free one (ready file: http_port)."""
    auth: Literal["local", "token"] = "local"
    """REST API auth: local = none (a fleet on loopback); token = bearer API tokens (deployments)."""
    api_tokens_file: str = ""
    """File of API token hashes, `<sha256> [read|write] [label]` per line (auth = token); see also RLFLEET_API_TOKENS."""
    max_request_bytes: int = Field(default=1_048_576, ge=1024, le=64 * 1_048_576)
    """Largest REST request body accepted; a bigger one gets 413."""
    events_poll_s: float = Field(default=0.5, gt=0, le=30)
    """How often an open event stream (GET /v1/jobs/{id}/events) looks for new steps."""
    tracking_dir: str = "runs/tracking"
    """Where experiment tracking writes: TensorBoard event files (<dir>/tensorboard/<job_id>/)
    and the default MLflow file store (<dir>/mlruns); relative to the working directory."""
    mlflow_tracking_uri: str = ""
    """MLflow tracking server of every job (e.g. http://mlflow:5000); empty: the local file
    store under tracking_dir. An operator setting: a job can turn MLflow off, not point it
    elsewhere."""

    @model_validator(mode="after")
    def _addresses_given(self) -> SchedulerConfig:
        missing = [
            name for name in ("reward_address", "trainer_address") if not getattr(self, name)
        ]
        if self.discovery == "static" and not self.rollout_list:
            missing.append("rollout_addresses")
        if self.discovery == "kubernetes" and not self.rollout_selector.strip():
            missing.append("rollout_selector")
        if missing:
            raise ValueError(f"set {', '.join(missing)} (host:port of each service)")
        if self.api_tokens_file and not Path(self.api_tokens_file).is_file():
            raise ValueError(f"api_tokens_file {self.api_tokens_file!r} does not exist")
        if self.auth == "token" and not self.api_tokens_file and not os.environ.get(TOKENS_ENV):
            raise ValueError(
                f"auth = token needs API token hashes: set api_tokens_file or {TOKENS_ENV} "
                "(`rlfleet token create` makes a token and its hash)"
            )
        return self

    @property
    def rollout_list(self) -> list[str]:
        return parse_addresses(self.rollout_addresses)

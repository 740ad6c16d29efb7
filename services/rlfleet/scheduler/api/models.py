"""Typed request and response bodies of the REST API.

The request body of ``POST /v1/jobs`` is the one ``JobSpec`` (rlfleet.common.jobspec);
the responses below are what the SDK in clients/python parses. The scheduler's
internal records (``scheduler.jobs``) stay internal: ``job_out`` and friends map
them, so a change of storage never changes the API.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from rlfleet.scheduler.jobs import Job, JobState, StepRecord


class _Out(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)


class JobOut(_Out):
    id: str
    """The job id the scheduler assigned (job-<hex>)."""
    name: str = ""
    """The spec's name, a label for people."""
    state: JobState
    """queued, running, succeeded, failed or cancelled."""
    reason: str = ""
    """Why the job failed or was cancelled."""
    current_step: int
    """Steps completed; also the step that runs next."""
    total_steps: int
    """Steps the job runs in all (spec.steps)."""
    policy_version: int
    """Policy version the rollout replicas hold for this job (optimizer steps taken)."""
    spec: dict[str, Any]
    """The validated job spec, defaults filled in."""
    created_at: float
    """Submission time, seconds since the epoch."""
    updated_at: float
    """Last change, seconds since the epoch."""
    summary: dict[str, float] = Field(default_factory=dict)
    """The latest step's metrics (reward_mean, loss, grad_norm, ...)."""


class JobPage(_Out):
    jobs: list[JobOut]
    """Jobs, newest first."""
    next_page_token: str = ""
    """Pass as page_token for the next page; empty on the last page."""


class StepOut(_Out):
    step: int
    """Step number, from 0."""
    metrics: dict[str, float] = Field(default_factory=dict)
    """The step's metrics: reward, trainer figures (loss, IcePop masking, KL), phase timings."""
    finished_at: float
    """When the step was recorded, seconds since the epoch."""


class StepList(_Out):
    steps: list[StepOut]
    next_since_step: int | None = None
    """Where the next page starts (pass it as `since_step`); null when this page holds the
    latest recorded step."""


class CheckpointOut(_Out):
    step: int
    """The step after which the checkpoint was written."""
    version: int
    """Policy version it holds (step + 1)."""
    path: str
    """Directory of the Hugging Face checkpoint, as the trainer sees it."""
    created_at: float = 0.0
    """When its step was recorded, seconds since the epoch."""


class CheckpointList(_Out):
    checkpoints: list[CheckpointOut]
    """Checkpoints the trainer keeps (spec.checkpoint.keep newest), oldest first."""


class FieldError(_Out):
    field: str
    """Dotted path of the offending field (e.g. algorithm.group_size), or the parameter name."""
    reason: str
    """What is wrong with it."""


class ErrorBody(_Out):
    detail: str
    """One sentence a person can act on."""
    errors: list[FieldError] = Field(default_factory=list)
    """For 422: each bad field and why."""


class Health(_Out):
    status: str
    """ok, or what is not ready."""
    checks: dict[str, bool] = Field(default_factory=dict)
    """Each readiness check and whether it passed."""


def job_out(job: Job) -> JobOut:
    try:
        spec = json.loads(job.spec_json)
    except ValueError:
        spec = {}
    return JobOut(
        id=job.job_id,
        name=str(spec.get("name", "")) if isinstance(spec, dict) else "",
        state=job.state,
        reason=job.reason,
        current_step=job.current_step,
        total_steps=job.total_steps,
        policy_version=job.policy_version,
        spec=spec if isinstance(spec, dict) else {},
        created_at=job.created_at,
        updated_at=job.updated_at,
        summary=job.summary,
    )


def step_out(record: StepRecord) -> StepOut:
    return StepOut(step=record.step, metrics=record.metrics, finished_at=record.finished_at)

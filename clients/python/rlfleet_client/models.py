"""Response models of the REST API (the server's OpenAPI schema at /openapi.json is
the reference; these mirror rlfleet.scheduler.api.models)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})


class Job(BaseModel):
    id: str
    name: str = ""
    state: JobState
    reason: str = ""
    current_step: int = 0
    total_steps: int = 0
    policy_version: int = 0
    spec: dict[str, Any] = Field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0
    summary: dict[str, float] = Field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES


class JobPage(BaseModel):
    jobs: list[Job]
    next_page_token: str = ""


class StepRecord(BaseModel):
    step: int
    metrics: dict[str, float] = Field(default_factory=dict)
    finished_at: float = 0.0


class Checkpoint(BaseModel):
    step: int
    version: int = 0
    path: str
    created_at: float = 0.0


class Event(BaseModel):
    """One server-sent event of a job's progress stream: "state", "step" or "end".

    ``data`` is a Job for "state" and "end", a StepRecord for "step" (see ``job``/``step``).
    """

    event: str
    data: dict[str, Any]

    @property
    def job(self) -> Job:
        return Job.model_validate(self.data)

    @property
    def step(self) -> StepRecord:
        return StepRecord.model_validate(self.data)
